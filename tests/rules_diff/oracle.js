// Answers authorization questions with Cedar's reference implementation, one per line, for
// rules_diff's shrinker: each stdin line is {"policies": {id: text}, "entities": [...],
// "request": {principal, action, resource, context}}; each stdout line is
// {"decision", "reason": [ids], "error_policies": [ids]} or {"failure": message}.
'use strict';

require('./cedar').avoidJitCrash();  // see cedar.js

const readline = require('readline');
const {loadCedar, authorize} = require('./cedar');

const cedar = loadCedar();
const lines = readline.createInterface({input: process.stdin, terminal: false});
lines.on('line', (line) => {
  let answer;
  try {
    const q = JSON.parse(line);
    answer = authorize(cedar, q.policies, q.entities, q.request);
  } catch (e) {
    answer = {failure: String(e && e.message ? e.message : e)};
  }
  process.stdout.write(JSON.stringify(answer) + '\n');
});
