// Generates differential test cases for medgate's Cedar-subset engine and answers each with
// Cedar's reference implementation (cedar-wasm).
//
//   node gen.js SEED COUNT OUT.json
//
// Deterministic: case k of seed S is drawn from its own PRNG seeded by (S, k), so a case can be
// regenerated alone. Every policy stays within medgate's subset (ledger/rules/ast.h); a case the
// reference refuses to parse or load is skipped and counted (the generator left the subset: the
// count should stay 0). Requests are kept so that allows, denies by a forbid and errors come out
// in roughly equal shares (default denies are kept only now and then).
'use strict';

require('./cedar').avoidJitCrash();  // before any hot code

const fs = require('fs');
const {loadCedar, preparedAuthorizer} = require('./cedar');

// ---- deterministic randomness ----

function mix32(a, b) {
  let h = (a ^ Math.imul(b + 0x9e3779b9, 0x85ebca6b)) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x7feb352d) >>> 0;
  h = Math.imul(h ^ (h >>> 15), 0x846ca68b) >>> 0;
  return (h ^ (h >>> 16)) >>> 0;
}

// mulberry32: small, fast and good enough for test generation.
class Rng {
  constructor(seed) { this.s = seed >>> 0; }
  next() {
    let t = (this.s = (this.s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(n) { return Math.floor(this.next() * n); }           // 0 .. n-1
  range(lo, hi) { return lo + this.int(hi - lo + 1); }      // lo .. hi
  chance(p) { return this.next() < p; }
  pick(a) { return a[this.int(a.length)]; }
  // Weighted choice over [[weight, value], ...].
  weighted(options) {
    let total = 0;
    for (const [w] of options) total += w;
    let x = this.next() * total;
    for (const [w, v] of options) {
      if ((x -= w) < 0) return v;
    }
    return options[options.length - 1][1];
  }
  subset(a, max) {
    const out = [];
    for (const x of a) if (out.length < max && this.chance(0.5)) out.push(x);
    return out;
  }
}

// ---- Cedar text ----

function quote(s) {
  let out = '"';
  for (const ch of s) {
    const c = ch.codePointAt(0);
    if (ch === '"') out += '\\"';
    else if (ch === '\\') out += '\\\\';
    else if (ch === '\n') out += '\\n';
    else if (ch === '\t') out += '\\t';
    else if (c === 0) out += '\\0';
    else if (c < 0x20 || c === 0x7f) out += `\\u{${c.toString(16)}}`;
    else out += ch;
  }
  return out + '"';
}

function uidText(u) { return `${u.type}::${quote(u.id)}`; }
function uid(type, id) { return {type, id}; }
function sameUid(a, b) { return a.type === b.type && a.id === b.id; }

// Strings the data and the policies share, so that comparisons and patterns hit now and then.
const WORDS = ['alice', 'bob', 'dr-lee', 'TREAT', 'ETREAT', 'vitals', 'labs', 'ICU', 'a*b', 'x y',
               'café', 'Zoë', '', 'a"q', 'back\\slash', 'tab\there', '日本', 'ab', 'abc', 'ICU-2'];
const PURPOSES = ['TREAT', 'ETREAT', 'AUDIT', 'RESEARCH'];
const IDS = ['a', 'b', 'c', 'dr-lee', 'x y', 'ü', 'q"t', '', '42', 'p/1', 'a*'];

const INT64_MAX = '9223372036854775807';

// ---- the entity graph of one case ----
//
// Principals: User -> Team -> Dept -> Org (depth 4), User -> Role.
// Resources: Record -> Patient -> Hospital::Ward -> Site, Record -> Category.
// Actions: read, write -> Action::"edit" -> Action::"all"; delete, export -> Action::"all".

const ATTRS = {
  User: {name: 'string', level: 'long', active: 'bool', tags: 'set:string', manager: 'entity:User',
         address: 'record', roles: 'set:entity', nums: 'set:long', ref: 'typeid'},
  Team: {name: 'string', level: 'long', tags: 'set:string'},
  Dept: {name: 'string', budget: 'long'},
  Org: {name: 'string'},
  Role: {name: 'string', level: 'long'},
  Record: {owner: 'entity:User', sensitivity: 'long', category: 'string', labels: 'set:string',
           meta: 'record', patient: 'entity:Patient'},
  Patient: {name: 'string', age: 'long', consent: 'set:string', ward: 'entity:Hospital::Ward',
            active: 'bool'},
  'Hospital::Ward': {name: 'string', beds: 'long'},
  Site: {name: 'string'},
  Category: {name: 'string', level: 'long'},
};
const CONTEXT = {purpose: 'string', now: 'long', emergency: 'bool', requester: 'entity:User',
                 tags: 'set:string', ctx: 'record', nums: 'set:long'};
const ACTIONS = ['read', 'write', 'delete', 'export'];
const ACTION_GROUPS = ['edit', 'all'];

class Graph {
  constructor(r) {
    this.r = r;
    this.byType = {};
    this.entities = [];  // Cedar JSON
    const n = (lo, hi) => r.range(lo, hi);
    const ids = (type, count) => {
      const out = [];
      for (let i = 0; i < count; i++) {
        let id = r.chance(0.3) ? r.pick(IDS) : `${type[0].toLowerCase()}${i}`;
        while (out.includes(id)) id += `${i}`;
        out.push(id);
      }
      return out.map((id) => uid(type, id));
    };
    for (const [type, lo, hi] of [['Org', 1, 1], ['Dept', 1, 2], ['Team', 1, 3], ['User', 2, 4],
                                  ['Role', 1, 2], ['Site', 1, 1], ['Hospital::Ward', 1, 2],
                                  ['Patient', 1, 3], ['Record', 2, 4], ['Category', 1, 2]]) {
      this.byType[type] = ids(type, n(lo, hi));
    }
    const parentsOf = {
      User: () => [...r.subset(this.byType.Team, 2), ...r.subset(this.byType.Role, 1),
                   ...(r.chance(0.2) ? [r.pick(this.byType.Dept)] : [])],
      Team: () => (r.chance(0.85) ? [r.pick(this.byType.Dept)] : []),
      Dept: () => (r.chance(0.9) ? [r.pick(this.byType.Org)] : []),
      Org: () => [],
      Role: () => (r.chance(0.3) ? [r.pick(this.byType.Role.filter((x) => x !== this.byType.Role[0]).concat([uid('Role', 'admin')]))] : []),
      Site: () => [],
      'Hospital::Ward': () => (r.chance(0.9) ? [r.pick(this.byType.Site)] : []),
      Patient: () => (r.chance(0.9) ? [r.pick(this.byType['Hospital::Ward'])] : []),
      Record: () => [r.pick(this.byType.Patient), ...r.subset(this.byType.Category, 1)],
      Category: () => [],
    };
    for (const type of Object.keys(this.byType)) {
      for (const u of this.byType[type]) {
        // Now and then an entity is only referred to (a parent, a principal), not in the store.
        if (type !== 'User' && r.chance(0.05)) continue;
        if (type === 'User' && r.chance(0.08)) continue;
        let parents = parentsOf[type]();
        if (type === 'Role') parents = parents.filter((p) => !sameUid(p, u));
        this.entities.push({uid: u, attrs: this.attrsFor(type), parents: dedupUids(parents)});
      }
    }
    // Actions and their groups. Role::"admin" (a parent above) is never in the store.
    this.actions = ACTIONS.map((a) => uid('Action', a));
    this.actionGroups = ACTION_GROUPS.map((a) => uid('Action', a));
    const actionParents = {read: ['all'], write: ['edit'], delete: ['all'], export: [], edit: ['all'], all: []};
    for (const a of [...ACTIONS, ...ACTION_GROUPS]) {
      if (r.chance(0.1)) continue;
      const ps = actionParents[a].filter(() => r.chance(0.9)).map((p) => uid('Action', p));
      this.entities.push({uid: uid('Action', a), attrs: {}, parents: ps});
    }
  }

  anyOf(...types) {
    const all = [];
    for (const t of types) all.push(...(this.byType[t] || []));
    return this.r.pick(all);
  }

  // An entity for a reference: mostly one of the graph's, sometimes one nobody knows.
  someEntity() {
    const r = this.r;
    if (r.chance(0.05)) return uid(r.pick(['User', 'Ghost', 'Patient']), r.pick(['nobody', 'zz']));
    return this.anyOf(r.pick(Object.keys(this.byType)));
  }

  attrsFor(type) {
    const r = this.r;
    const attrs = {};
    for (const [name, t] of Object.entries(ATTRS[type])) {
      if (r.chance(0.2)) continue;
      attrs[name] = this.jsonValue(r.chance(0.07) ? r.pick(['string', 'long', 'bool', 'set:long']) : t, 2);
    }
    return attrs;
  }

  // A value of (roughly) type `t` in Cedar's JSON form. Longs stay within 2^53: JSON numbers
  // pass through JavaScript doubles.
  jsonValue(t, depth) {
    const r = this.r;
    switch (t.split(':')[0]) {
      case 'string': return r.pick(WORDS);
      case 'long': return r.weighted([[6, r.range(-3, 12)], [2, r.range(1e9, 2e9)], [1, r.pick([2 ** 53 - 1, -(2 ** 53 - 1), 2 ** 32, 4611686018])]]);
      case 'bool': return r.chance(0.5);
      // A record that looks like an entity reference without `__entity`: Cedar (without a
      // schema) takes it as a record with the attributes type and id.
      case 'typeid': {
        const e = this.anyOf('User');
        return {type: e.type, id: e.id};
      }
      case 'entity': {
        const e = t.includes(':') && r.chance(0.8) && this.byType[t.slice(t.indexOf(':') + 1)]
                      ? r.pick(this.byType[t.slice(t.indexOf(':') + 1)])
                      : this.someEntity();
        return {__entity: {type: e.type, id: e.id}};
      }
      case 'set': {
        const et = t.slice(4) || 'string';
        const out = [];
        for (let i = r.range(0, 4); i > 0; i--) {
          out.push(this.jsonValue(et === 'entity' ? 'entity:Role' : et, depth - 1));
        }
        return out;
      }
      case 'record': {
        if (depth <= 0) return {};
        const out = {};
        if (r.chance(0.8)) out.city = r.pick(WORDS);
        if (r.chance(0.8)) out.zip = this.jsonValue('long', 0);
        if (r.chance(0.5)) out.by = this.jsonValue('entity:User', 0);
        if (r.chance(0.5)) out.flags = this.jsonValue('set:string', 0);
        if (r.chance(0.4)) out.inner = this.jsonValue('record', depth - 1);
        if (r.chance(0.2)) out['odd key'] = r.chance(0.5);
        return out;
      }
    }
    throw new Error(`no value for ${t}`);
  }

  context() {
    const out = {};
    for (const [name, t] of Object.entries(CONTEXT)) {
      if (this.r.chance(0.15)) continue;
      if (name === 'purpose' && this.r.chance(0.85)) {
        out.purpose = this.r.pick(PURPOSES);
        continue;
      }
      out[name] = this.jsonValue(this.r.chance(0.05) ? 'long' : t, 2);
    }
    return out;
  }

  request() {
    const r = this.r;
    const principal = r.weighted([[8, () => this.anyOf('User')], [1, () => this.anyOf('Team', 'Role')],
                                  [1, () => uid('User', 'stranger')]])();
    const resource = r.weighted([[8, () => this.anyOf('Record')], [1, () => this.anyOf('Patient')],
                                 [1, () => uid('Record', 'unknown')]])();
    return {principal, action: r.pick(this.actions), resource, context: this.context()};
  }
}

function dedupUids(list) {
  const out = [];
  for (const u of list) if (!out.some((x) => sameUid(x, u))) out.push(u);
  return out;
}

// ---- policies ----

const REL = ['==', '!=', '<', '<=', '>', '>='];

class PolicyGen {
  constructor(r, g) {
    this.r = r;
    this.g = g;
  }

  // A literal Long: small, or at the edges of 64 bits so that arithmetic overflows.
  longLiteral() {
    const r = this.r;
    return r.weighted([
      [8, () => String(r.range(0, 12))],
      [2, () => `-${r.range(1, 5)}`],
      [2, () => r.pick([INT64_MAX, '9223372036854775806', '4611686018427387904', '3037000500',
                        '-9223372036854775807', '(-9223372036854775807 - 1)', '1900000000'])],
      [0.3, () => '-9223372036854775808'],
    ])();
  }

  stringLiteral() { return quote(this.r.pick(WORDS)); }

  // Access to an attribute of `base` (an entity or record expression text) by . or ["..."].
  access(base, name) {
    if (/^[A-Za-z_][A-Za-z0-9_]*$/.test(name) && this.r.chance(0.8)) return `${base}.${name}`;
    return `${base}[${quote(name)}]`;
  }

  // Names of attributes of type t on User (principal), Record (resource) and the context.
  attrsOfType(t) {
    const out = [];
    for (const [name, at] of Object.entries(ATTRS.User)) if (at.startsWith(t)) out.push(['principal', name]);
    for (const [name, at] of Object.entries(ATTRS.Record)) if (at.startsWith(t)) out.push(['resource', name]);
    for (const [name, at] of Object.entries(CONTEXT)) if (at.startsWith(t)) out.push(['context', name]);
    return out;
  }

  attrExpr(t) {
    const r = this.r;
    const options = this.attrsOfType(t);
    if (t === 'long') options.push(['principal.address', 'zip'], ['context.ctx', 'zip']);
    if (t === 'string') options.push(['principal.address', 'city'], ['resource.patient', 'name']);
    if (t === 'record') options.push(['context.ctx', 'inner'], ['resource.meta', 'inner']);
    if (t === 'entity') options.push(['resource.meta', 'by']);
    const [base, name] = r.pick(options);
    const expr = this.access(base.includes('.') ? `(${base})` : base, name);
    // Guard with `has` now and then, as careful policy authors do.
    if (r.chance(0.25) && !base.includes('.')) return {guard: `(${base} has ${name})`, expr};
    return {expr};
  }

  // An expression that (mostly) evaluates to a value of type t.
  expr(t, depth) {
    const r = this.r;
    if (depth > 0 && r.chance(0.04)) t = r.pick(['bool', 'long', 'string', 'set', 'entity']);  // a type mistake
    switch (t) {
      case 'bool': return this.boolExpr(depth);
      case 'long': return this.longExpr(depth);
      case 'string': return this.stringExpr(depth);
      case 'entity': return this.entityExpr(depth);
      case 'set': return this.setExpr(depth);
      case 'record': return this.recordExpr(depth);
    }
    throw new Error(t);
  }

  withGuard(a) { return a.guard && this.r.chance(0.7) ? a : {expr: a.expr}; }

  ifExpr(t, depth) {
    return `(if ${this.boolExpr(depth - 1)} then ${this.expr(t, depth - 1)} else ${this.expr(t, depth - 1)})`;
  }

  longExpr(depth) {
    const r = this.r;
    const leaf = () => (r.chance(0.5) ? this.longLiteral() : this.attrExpr('long').expr);
    if (depth <= 0) return leaf();
    return r.weighted([
      [4, leaf],
      [3, () => `(${this.longExpr(depth - 1)} ${r.pick(['+', '-', '*'])} ${this.longExpr(depth - 1)})`],
      [0.7, () => `(-${this.longExpr(depth - 1)})`],
      [0.7, () => this.ifExpr('long', depth)],
    ])();
  }

  stringExpr(depth) {
    const r = this.r;
    if (depth <= 0 || r.chance(0.8)) {
      return r.chance(0.4) ? this.stringLiteral() : this.attrExpr('string').expr;
    }
    return this.ifExpr('string', depth);
  }

  entityLiteral() { return uidText(this.g.someEntity()); }

  entityExpr(depth) {
    const r = this.r;
    return r.weighted([
      [3, () => 'principal'],
      [3, () => 'resource'],
      [1, () => 'action'],
      [3, () => this.entityLiteral()],
      [2, () => this.attrExpr('entity').expr],
      [depth > 0 ? 0.5 : 0, () => this.ifExpr('entity', depth)],
    ])();
  }

  setExpr(depth, elem) {
    const r = this.r;
    elem = elem || r.pick(['string', 'long', 'entity']);
    return r.weighted([
      [3, () => {
        const out = [];
        for (let i = r.range(0, 3); i > 0; i--) out.push(this.expr(elem, Math.min(depth - 1, 0)));
        return `[${out.join(', ')}]`;
      }],
      [3, () => this.attrExpr(`set:${elem === 'entity' ? 'entity' : elem}`).expr],
      [depth > 0 ? 0.3 : 0, () => this.ifExpr('set', depth)],
    ])();
  }

  recordExpr(depth) {
    const r = this.r;
    if (r.chance(0.6)) return this.attrExpr('record').expr;
    const keys = r.subset(['city', 'zip', 'odd key', 'flags'], 3);
    const fields = keys.map((k) => {
      const v = k === 'city' ? this.stringExpr(0) : k === 'zip' ? this.longExpr(0) : k === 'flags' ? this.setExpr(0, 'string') : (r.chance(0.5) ? 'true' : 'false');
      return `${/ /.test(k) ? quote(k) : k}: ${v}`;
    });
    return `{${fields.join(', ')}}`;
  }

  boolExpr(depth) {
    const r = this.r;
    const leaves = [
      [0.5, () => r.pick(['true', 'false'])],
      [1, () => {
        const a = this.withGuard(this.attrExpr('bool'));
        return a.guard ? `(${a.guard} && ${a.expr})` : a.expr;
      }],
      [4, () => {  // Long comparison, often against data
        const a = this.withGuard(this.attrExpr('long'));
        const cmp = `(${a.expr} ${r.pick(REL)} ${r.chance(0.7) ? this.longLiteral() : this.longExpr(Math.max(depth - 1, 0))})`;
        return a.guard ? `(${a.guard} && ${cmp})` : cmp;
      }],
      [3, () => {  // string equality and `like`
        const a = this.withGuard(this.attrExpr('string'));
        const test = r.chance(0.5)
            ? `(${a.expr} ${r.pick(['==', '!='])} ${r.chance(0.8) ? this.stringLiteral() : this.stringExpr(0)})`
            : `(${a.expr} like ${this.pattern()})`;
        return a.guard ? `(${a.guard} && ${test})` : test;
      }],
      [2, () => `(context.purpose == ${quote(r.pick(PURPOSES))})`],
      [3, () => `(${this.entityExpr(0)} in ${this.inTarget()})`],
      [1.5, () => `(${this.entityExpr(0)} ${r.pick(['==', '!='])} ${this.entityExpr(0)})`],
      [1.5, () => {
        const [base, name] = r.pick([['principal', r.pick(Object.keys(ATTRS.User))],
                                     ['resource', r.pick(Object.keys(ATTRS.Record))],
                                     ['context', r.pick(Object.keys(CONTEXT))],
                                     ['(principal.address)', r.pick(['city', 'zip', 'odd key'])],
                                     ['(context.ctx)', r.pick(['inner', 'zip'])]]);
        const attr = /^[a-z]+$/.test(name) && r.chance(0.7) ? name : quote(name);
        return `(${base} has ${attr})`;
      }],
      [1.5, () => {
        const t = r.pick(['User', 'Record', 'Patient', 'Team', 'Hospital::Ward']);
        return r.chance(0.6) ? `(${this.entityExpr(0)} is ${t})` : `(${this.entityExpr(0)} is ${t} in ${this.inTarget()})`;
      }],
      [2, () => {  // set methods
        const elem = r.pick(['string', 'long', 'entity']);
        const m = r.pick(['contains', 'containsAll', 'containsAny']);
        const arg = m === 'contains' ? this.expr(elem, 0) : this.setExpr(0, elem);
        return `(${this.setExpr(0, elem)}).${m}(${arg})`;
      }],
      [1, () => `(${this.recordExpr(0)} ${r.pick(['==', '!='])} ${this.recordExpr(0)})`],
      [0.4, () => r.pick([`(principal.ref == ${uidText(this.g.anyOf('User'))})`,
                          `((principal has ref) && (principal.ref has id))`,
                          `(principal.ref.id == ${quote(this.g.anyOf('User').id)})`])],
      [0.4, () => {  // && and || whose right side is not a bool, used as a value
        const op = r.pick(['&&', '||']);
        const bad = r.pick(['1', '"yes"', 'principal', '[true]', '{}']);
        return `((${r.pick(['true', 'false', '(context.purpose == "TREAT")'])} ${op} ${bad}) ${r.pick(['==', '!='])} ${r.pick(['true', 'false', bad])})`;
      }],
      [1.5, () => {  // arithmetic at the edge of 64 bits: overflows depend on the data
        const a = this.attrExpr('long').expr;
        return r.pick([
          `((${a} + 9223372036854775800) > 0)`,
          `((${a} - 9223372036854775800) < 0)`,
          `((${a} * 4611686018427387904) != 0)`,
          `((${a} * ${a} * ${a}) >= 0)`,
          `((-${a}) <= 0)`,
          `(((-9223372036854775807 - 1) + ${a}) < 0)`,
          `((3037000500 * 3037000500) > ${a})`,
          `((${a} * -1) == (-${a}))`,
          `((-(-9223372036854775807 - 1)) ${r.pick(REL)} ${a})`,
          `((-${this.longLiteral()}) ${r.pick(REL)} ${a})`,
        ]);
      }],
      [1, () => {  // the matcher alone: a word against a pattern made from it (or another)
        const word = r.pick(WORDS);
        return `(${quote(r.chance(0.7) ? word : r.pick(WORDS))} like ${this.pattern(word)})`;
      }],
      [0.7, () => `(${this.setExpr(0)} ${r.pick(['==', '!='])} ${this.setExpr(0)})`],
    ];
    if (depth <= 0) return r.weighted(leaves)();
    return r.weighted([
      [6, () => r.weighted(leaves)()],
      [2.5, () => `(${this.boolExpr(depth - 1)} && ${this.operand(depth - 1)})`],
      [2.5, () => `(${this.boolExpr(depth - 1)} || ${this.operand(depth - 1)})`],
      // Booleans as values: a non-bool that leaked out of && || (`true && 1`) shows here.
      [1, () => `(${this.boolExpr(depth - 1)} ${r.pick(['==', '!='])} ${r.pick(['true', 'false', this.boolExpr(depth - 1)])})`],
      [0.5, () => `[${this.boolExpr(depth - 1)}, ${this.boolExpr(0)}].contains(${r.pick(['true', 'false'])})`],
      [1, () => `(!${this.boolExpr(depth - 1)})`],
      [0.8, () => this.ifExpr('bool', depth)],
      [0.4, () => `(${this.expr(r.pick(['long', 'string', 'entity', 'bool']), depth - 1)} == ${this.expr(r.pick(['long', 'string', 'entity', 'bool']), depth - 1)})`],
    ])();
  }

  // The right operand of && and ||: now and then not a bool at all (a type error only when it
  // is reached).
  operand(depth) {
    if (this.r.chance(0.1)) return this.r.pick(['1', '"yes"', 'principal', '[true]', `(${this.longExpr(0)})`]);
    return this.boolExpr(depth);
  }

  // The right side of `in`: an entity (often an ancestor in the graph) or a set of entities.
  inTarget() {
    const r = this.r;
    const g = this.g;
    const ancestor = () => uidText(g.anyOf(r.pick(['Team', 'Dept', 'Org', 'Role', 'Patient', 'Hospital::Ward', 'Site', 'Category'])));
    return r.weighted([
      [5, ancestor],
      [1, () => uidText(g.someEntity())],
      [2, () => {
        const out = [];
        for (let i = r.range(0, 3); i > 0; i--) out.push(ancestor());
        if (r.chance(0.1)) out.push(this.longLiteral());  // a set with a non-entity: an error
        return `[${out.join(', ')}]`;
      }],
      [1, () => this.attrExpr('set:entity').expr],
      [0.5, () => this.attrExpr('entity').expr],
    ])();
  }

  // A `like` pattern: runs of text from the vocabulary, wildcards and escaped stars.
  pattern(word) {
    const r = this.r;
    word = word === undefined ? r.pick(WORDS) : word;
    const parts = [];
    const pieces = r.weighted([[3, () => [word]], [2, () => [word.slice(0, 2), '*']],
                               [2, () => ['*', word.slice(-2)]], [1, () => ['*']],
                               [1, () => ['*', word.slice(1, 3), '*']], [0.5, () => ['a', '\\*', '*']],
                               [1, () => [word.slice(0, 1), '*', word.slice(-1)]],
                               // prefix and suffix that would overlap on the word itself
                               [1, () => [word, '*', word.slice(-1)]], [0.5, () => [word.slice(0, 2), '*', word.slice(1)]]])();
    for (const p of pieces) {
      if (p === '*' || p === '\\*') parts.push(p);
      else parts.push(quote(p).slice(1, -1).replace(/\*/g, '\\*'));
    }
    return `"${parts.join('')}"`;
  }

  scope(kind) {
    const r = this.r;
    const g = this.g;
    if (kind === 'action') {
      return r.weighted([
        [6, () => 'action'],
        [3, () => `action == ${uidText(r.pick(g.actions))}`],
        [2, () => `action in ${uidText(r.pick([...g.actionGroups, ...g.actions]))}`],
        [2, () => `action in [${r.subset([...g.actions, ...g.actionGroups], 3).map(uidText).join(', ')}]`],
      ])();
    }
    const [leaf, groups, leafType] = kind === 'principal'
        ? [['User'], ['Team', 'Dept', 'Org', 'Role'], 'User']
        : [['Record'], ['Patient', 'Hospital::Ward', 'Site', 'Category'], 'Record'];
    return r.weighted([
      [6, () => kind],
      [2, () => `${kind} == ${uidText(g.anyOf(...leaf))}`],
      [3, () => `${kind} in ${uidText(g.anyOf(...groups))}`],
      [1, () => `${kind} is ${r.chance(0.8) ? leafType : r.pick(groups)}`],
      [1, () => `${kind} is ${leafType} in ${uidText(g.anyOf(...groups))}`],
    ])();
  }

  policy(idAnnotation) {
    const r = this.r;
    const effect = r.chance(0.55) ? 'permit' : 'forbid';
    const lines = [];
    if (idAnnotation !== undefined) lines.push(`@id(${quote(idAnnotation)})`);
    if (r.chance(0.1)) lines.push(`@reason(${quote(r.pick(WORDS))})`);
    if (r.chance(0.05)) lines.push('// a comment');
    lines.push(`${effect}(${this.scope('principal')}, ${this.scope('action')}, ${this.scope('resource')})`);
    const conditions = r.weighted([[3, 0], [5, 1], [2, 2], [0.5, 3]]);
    for (let i = 0; i < conditions; i++) {
      const kw = r.chance(0.75) ? 'when' : 'unless';
      lines.push(`${kw} { ${this.boolExpr(r.range(0, 3))} }`);
    }
    return `${lines.join('\n')};`;
  }
}

// ---- one case ----

const ANNOTATED_IDS = ['grant-1', 'rule.a', 'ünï', 'x y', 'forbid-icu', 'P', 'base/1', 'e'];

function makeCase(seed, k) {
  const r = new Rng(mix32(seed >>> 0, k));
  const g = new Graph(r);
  const pg = new PolicyGen(r, g);
  const count = r.weighted([[1, 1], [3, 2], [3, 3], [2, 4], [1, 6]]);
  const texts = {};
  const parts = [];
  const unusedIds = [...ANNOTATED_IDS];
  for (let i = 0; i < count; i++) {
    let id = `policy${i}`;
    let annotation;
    if (r.chance(0.3)) {
      annotation = unusedIds.splice(r.int(unusedIds.length), 1)[0];
      id = annotation;
    }
    const text = pg.policy(annotation);
    texts[id] = text;
    parts.push(text);
  }
  const requests = [];
  for (let i = 0; i < 16; i++) requests.push(g.request());
  return {policies: parts.join('\n\n') + '\n', texts, entities: g.entities, requests, r};
}

function outcome(expected) {
  if (expected.error_policies.length > 0) return 'error';
  if (expected.decision === 'allow') return 'allow';
  return expected.reason.length > 0 ? 'forbid' : 'default';
}

function main() {
  const [seedArg, countArg, out] = process.argv.slice(2);
  if (!out || !/^\d+$/.test(seedArg) || !/^\d+$/.test(countArg)) {
    process.stderr.write('usage: node gen.js SEED COUNT OUT.json\n');
    process.exit(2);
  }
  const seed = Number(seedArg);
  const count = Number(countArg);
  const cedar = loadCedar();
  const kept = {allow: 0, forbid: 0, error: 0, default: 0};
  const raw = {allow: 0, forbid: 0, error: 0, default: 0};
  const cases = [];
  let skipped = 0;
  let firstSkip = '';
  for (let k = 0; k < count; k++) {
    const c = makeCase(seed, k);
    const answered = [];
    const authorize = preparedAuthorizer(cedar, c.texts);
    let failure = authorize.failure || null;
    for (const req of failure ? [] : c.requests) {
      const expected = authorize(c.entities, req);
      if (expected.failure) {
        failure = expected.failure;
        break;
      }
      answered.push({...req, expected});
      raw[outcome(expected)]++;
    }
    if (failure) {
      if (!firstSkip) firstSkip = `seed ${seed} case ${k}: ${failure}`;
      skipped++;
      continue;
    }
    // Keep at most 6 requests, preferring the outcomes that are behind their shares.
    const requests = [];
    for (const req of answered) {
      if (requests.length >= 6) break;
      const o = outcome(req.expected);
      const total = kept.allow + kept.forbid + kept.error + kept.default + 1;
      if (kept[o] / total > (o === 'default' ? 0.06 : 0.32) && !c.r.chance(0.03)) continue;
      kept[o]++;
      requests.push(req);
    }
    if (requests.length === 0) {
      // The least represented outcome among the answers.
      answered.sort((a, b) => kept[outcome(a.expected)] - kept[outcome(b.expected)]);
      kept[outcome(answered[0].expected)]++;
      requests.push(answered[0]);
    }
    cases.push({id: `${seed}/${k}`, policies: c.policies, entities: c.entities, requests});
  }
  fs.writeFileSync(out, JSON.stringify({generator: 'gen.js', cedar: cedar.getCedarVersion(), seed, count,
                                        skipped, kept, raw, cases}));
  const n = kept.allow + kept.forbid + kept.error + kept.default;
  const pct = (x) => `${(100 * x / Math.max(n, 1)).toFixed(0)}%`;
  process.stdout.write(`gen.js: seed ${seed}: ${cases.length} cases, ${n} requests (allow ${pct(kept.allow)}, ` +
                       `deny by forbid ${pct(kept.forbid)}, error ${pct(kept.error)}, default deny ` +
                       `${pct(kept.default)}), ${skipped} skipped\n`);
  if (process.env.GEN_VERBOSE) process.stdout.write(`gen.js: before selection ${JSON.stringify(raw)}\n`);
  if (skipped > 0) process.stderr.write(`gen.js: first skipped case: ${firstSkip}\n`);
}

main();
