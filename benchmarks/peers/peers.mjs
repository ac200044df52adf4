// rate-limiter-flexible (RateLimiterRedis on ioredis): `consume` with N in flight over K
// keys for D seconds, against the same Redis. Same last-line format as examples/loadgen.
// The first line names the versions measured.
// Usage: node peers.mjs PORT CONCURRENCY DURATION_SECS IDENTIFIERS
import Redis from "ioredis";
import { RateLimiterRedis } from "rate-limiter-flexible";

import { createRequire } from "node:module";
const require = createRequire(import.meta.url);
const [port, concurrency, duration, identifiers] = process.argv.slice(2).map(Number);
console.log(
  `rate-limiter-flexible ${require("rate-limiter-flexible/package.json").version}, ` +
    `ioredis ${require("ioredis/package.json").version}, node ${process.version}`,
);
const redis = new Redis({ port, host: "127.0.0.1", enableOfflineQueue: false });
await new Promise((ok) => redis.once("ready", ok));
const limiter = new RateLimiterRedis({
  storeClient: redis,
  keyPrefix: `rlf-${Date.now()}`,
  points: 1e12, // never denies, like loadgen's limiter
  duration: 3600,
});
const latencies = [];
const deadline = performance.now() + duration * 1000;
let errors = 0;
async function worker(w) {
  let i = w;
  while (performance.now() < deadline) {
    const key = `user-${i++ % identifiers}`;
    const t = performance.now();
    try {
      await limiter.consume(key, 1);
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
