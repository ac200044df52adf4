// rate-limiter-flexible (RateLimiterRedis on ioredis): `consume` with N in flight over K
// keys for D seconds, against the same Redis. Same last-line format as examples/loadgen.
// The first line names the versions measured.
//
// With LIMITS (2 or 4), each call does what a user of this peer does for the shape that
// `loadgen --through layer --limits LIMITS` measures: before the call, `consume` one
// request from each request limiter and `get` each token limiter (allowed while tokens
// remain); after it, `penalty` each token limiter with the call's 150 tokens. Each phase's
// operations go out together (Promise.all), the fastest way this peer allows; it has no
// all-or-nothing across limiters. One call counts as one decision.
// Usage: node peers.mjs PORT CONCURRENCY DURATION_SECS IDENTIFIERS [LIMITS]
import Redis from "ioredis";
import { RateLimiterRedis } from "rate-limiter-flexible";

import { createRequire } from "node:module";
const require = createRequire(import.meta.url);
const [port, concurrency, duration, identifiers, limits = 1] = process.argv.slice(2).map(Number);
console.log(
  `rate-limiter-flexible ${require("rate-limiter-flexible/package.json").version}, ` +
    `ioredis ${require("ioredis/package.json").version}, node ${process.version}`,
);
const redis = new Redis({ port, host: "127.0.0.1", enableOfflineQueue: false });
await new Promise((ok) => redis.once("ready", ok));
const run = Date.now();
// Never denies, like loadgen's limits.
const limiterOf = (name, duration) =>
  new RateLimiterRedis({ storeClient: redis, keyPrefix: `rlf-${run}-${name}`, points: 1e12, duration });
const limiter = limiterOf("rpm", 3600);
const requestLimiters = [limiter, ...(limits === 4 ? [limiterOf("rpd", 86400)] : [])];
const tokenLimiters =
  limits === 1 ? [] : [limiterOf("tpm", 3600), ...(limits === 4 ? [limiterOf("tpd", 86400)] : [])];
async function call(key) {
  if (limits === 1) return limiter.consume(key, 1);
  const [, ...tokens] = await Promise.all([
    ...requestLimiters.map((l) => l.consume(key, 1)),
    ...tokenLimiters.map((l) => l.get(key)),
  ]).then((r) => [null, ...r.slice(requestLimiters.length)]);
  if (tokens.some((t) => t && t.remainingPoints <= 0)) throw new Error("denied");
  await Promise.all(tokenLimiters.map((l) => l.penalty(key, 150)));
}
const latencies = [];
const deadline = performance.now() + duration * 1000;
let errors = 0;
async function worker(w) {
  let i = w;
  while (performance.now() < deadline) {
    const key = `user-${i++ % identifiers}`;
    const t = performance.now();
    try {
      await call(key);
      latencies.push((performance.now() - t) * 1000);
    } catch {
      errors++;
    }
  }
}
const cpuBefore = process.cpuUsage();
const started = performance.now();
await Promise.all(Array.from({ length: concurrency }, (_, w) => worker(w)));
const elapsed = (performance.now() - started) / 1000;
const cpu = process.cpuUsage(cpuBefore);
latencies.sort((a, b) => a - b);
const pct = (p) => Math.round(latencies[Math.round((latencies.length - 1) * p)] ?? 0);
if (errors) console.log(`rate-limiter-flexible: ${errors} errors`);
const clientCpu = (cpu.user + cpu.system) / Math.max(latencies.length, 1);
console.log(
  `decisions_per_sec=${Math.round(latencies.length / elapsed)} p50_us=${pct(0.5)} p99_us=${pct(0.99)} ` +
    `decisions=${latencies.length} client_cpu_us_per_decision=${clientCpu.toFixed(2)}`,
);
redis.disconnect();
