// Loads Cedar's reference implementation (cedar-wasm) for the differential test and the benchmark.
// The package lives in the build tree (setup runs `npm ci` there), never in the source tree:
// MEDGATE_CEDAR_MODULES names the directory that holds its node_modules.
'use strict';

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

// One authorization by the reference. `policies` maps policy id -> the text of that one policy.
// Returns {decision, reason: [sorted ids], error_policies: [sorted ids]} or {failure: message}.
function authorize(cedar, policies, entities, request) {
  const answer = cedar.isAuthorized({
    principal: request.principal,
    action: request.action,
    resource: request.resource,
    context: request.context,
    policies: {staticPolicies: policies},
    entities,
  });
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

module.exports = {loadCedar, authorize};
