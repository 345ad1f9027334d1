// Loads Cedar's reference implementation (cedar-wasm) for the differential test and the benchmark.
// The package lives in the build tree (setup runs `npm ci` there), never in the source tree:
// MEDGATE_CEDAR_MODULES names the directory that holds its node_modules.
'use strict';

// Node 20's V8 (11.3) now and then dies in its deoptimizer on the generator's workload (a fatal
// "unreachable code" in DoComputeBuiltinContinuation, about one run in ten of 2,000 cases; not a
// JavaScript error). Without the optimizing JIT it does not happen, and the time goes to wasm
// anyway. V8 reads flags at start, so the script runs itself again under node --no-opt.
function avoidJitCrash() {
  if (process.execArgv.includes('--no-opt')) return;
  const {spawnSync} = require('child_process');
  const run = spawnSync(process.execPath, ['--no-opt', ...process.execArgv, ...process.argv.slice(1)],
                        {stdio: 'inherit'});
  process.exit(run.status === null ? 1 : run.status);
}

function loadCedar() {
  const dir = process.env.MEDGATE_CEDAR_MODULES;
  const paths = dir ? [dir] : [__dirname];
  let file;
  try {
    file = require.resolve('@cedar-policy/cedar-wasm/nodejs', {paths});
  } catch (e) {
    process.stderr.write(
        `rules_diff: @cedar-policy/cedar-wasm is not installed under ${paths[0]} ` +
        `(MEDGATE_CEDAR_MODULES); run ./setup, which runs npm ci into the build tree\n`);
    process.exit(3);
  }
  return require(file);
}

// The reference's answer as {decision, reason: [sorted ids], error_policies: [sorted ids]}, or
// {failure: message} when it refused the input.
function answerOf(answer) {
  if (answer.type !== 'success') {
    return {failure: answer.errors.map((e) => e.message).join('; ')};
  }
  const d = answer.response.diagnostics;
  return {
    decision: answer.response.decision,
    reason: [...d.reason].sort(),
    error_policies: [...new Set(d.errors.map((e) => e.policyId))].sort(),
  };
}

// One authorization by the reference. `policies` maps policy id -> the text of that one policy.
function authorize(cedar, policies, entities, request) {
  return answerOf(cedar.isAuthorized({
    principal: request.principal,
    action: request.action,
    resource: request.resource,
    context: request.context,
    policies: {staticPolicies: policies},
    entities,
  }));
}

// Many authorizations against one policy set, parsed once (preparsePolicySet): returns
// {failure} or a function (entities, request) -> answer as above.
function preparedAuthorizer(cedar, policies) {
  const parsed = cedar.preparsePolicySet('gen', {staticPolicies: policies});
  if (parsed.type !== 'success') return {failure: parsed.errors.map((e) => e.message).join('; ')};
  return (entities, request) => answerOf(cedar.statefulIsAuthorized({
    principal: request.principal,
    action: request.action,
    resource: request.resource,
    context: request.context,
    preparsedPolicySetId: 'gen',
    entities,
  }));
}

module.exports = {avoidJitCrash, loadCedar, authorize, preparedAuthorizer};
