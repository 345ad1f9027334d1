// The reference side of bench_rules_cedar: times Cedar's reference implementation (cedar-wasm) on the
// benchmark's policy set and requests, as bench_rules_cedar wrote them.
//
//   node bench.js DIR [--seconds S] [--max N]
//
// DIR holds policies.json ({id: text}), requests.json ([{principal, action, resource, context,
// entities, decision}], each with the slice of entities its request needs: the principal, the
// resource and their parents). The policy set is parsed once with preparsePolicySet and each
// request is answered with statefulIsAuthorized, timed alone. Prints one JSON object: the API
// used, the parse time, the first call's time (untimed warm-up otherwise), decisions/s, p50/p99 latency in µs, and how many decisions differ from
// medgate's (the `decision` of each request).
'use strict';

require('./cedar').avoidJitCrash();  // costs cedar-wasm nothing measurable: its time is in wasm

const fs = require('fs');
const path = require('path');
const {loadCedar} = require('./cedar');

function main() {
  const args = process.argv.slice(2);
  const dir = args[0];
  let seconds = 20;
  let max = Infinity;
  for (let i = 1; i < args.length; i += 2) {
    if (args[i] === '--seconds') seconds = Number(args[i + 1]);
    else if (args[i] === '--max') max = Number(args[i + 1]);
    else throw new Error(`unknown option ${args[i]}`);
  }
  const cedar = loadCedar();
  let policies = JSON.parse(fs.readFileSync(path.join(dir, 'policies.json'), 'utf8'));
  let t0 = process.hrtime.bigint();
  const parsed = cedar.preparsePolicySet('bench', {staticPolicies: policies});
  const parseMs = Number(process.hrtime.bigint() - t0) / 1e6;
  if (parsed.type !== 'success') {
    process.stdout.write(JSON.stringify({failure: parsed.errors.map((e) => e.message).join('; ')}) + '\n');
    process.exit(1);
  }
  policies = null;
  // Read after the parse: a large JavaScript heap during preparsePolicySet slows it down twofold
  // (the policies cross into wasm as JSON).
  const requests = JSON.parse(fs.readFileSync(path.join(dir, 'requests.json'), 'utf8'));
  const ask = (q) => cedar.statefulIsAuthorized({
    principal: q.principal,
    action: q.action,
    resource: q.resource,
    context: q.context,
    preparsedPolicySetId: 'bench',
    entities: q.entities,
  });
  // The first call after the parse is several times slower than the rest: timed apart.
  t0 = process.hrtime.bigint();
  if (requests.length > 0) ask(requests[0]);
  const firstMs = Number(process.hrtime.bigint() - t0) / 1e6;

  const latencies = [];
  let mismatches = 0;
  let firstMismatch = null;
  let errors = 0;
  const deadline = process.hrtime.bigint() + BigInt(Math.round(seconds * 1e9));
  t0 = process.hrtime.bigint();
  for (let i = 0; i < requests.length && latencies.length < max; i++) {
    const q = requests[i];
    const a = process.hrtime.bigint();
    const answer = ask(q);
    const b = process.hrtime.bigint();
    latencies.push(Number(b - a));
    if (answer.type !== 'success') {
      errors++;
    } else {
      if (answer.response.diagnostics.errors.length > 0) errors++;
      if (answer.response.decision !== q.decision) {
        mismatches++;
        if (!firstMismatch) firstMismatch = {request: i, cedar: answer.response.decision, medgate: q.decision};
      }
    }
    if (b > deadline) break;
  }
  const totalNs = Number(process.hrtime.bigint() - t0);
  latencies.sort((x, y) => x - y);
  const at = (q) => latencies[Math.floor(q * (latencies.length - 1))] / 1000;
  process.stdout.write(JSON.stringify({
    api: 'preparsePolicySet once, then statefulIsAuthorized per request',
    cedar: cedar.getCedarVersion(),
    node: process.version,
    parse_ms: parseMs,
    first_call_ms: firstMs,
    requests: latencies.length,
    decisions_per_s: latencies.length / (totalNs / 1e9),
    p50_us: at(0.5),
    p99_us: at(0.99),
    mismatches,
    first_mismatch: firstMismatch,
    answers_with_errors: errors,
  }) + '\n');
}

main();
