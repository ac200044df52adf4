// rate-limiter-flexible (RateLimiterRedis on ioredis): `consume` with N in flight over K
// keys for D seconds, against the same Redis. Same last-line format as examples/loadgen.
// Usage: node peers.mjs PORT CONCURRENCY DURATION_SECS IDENTIFIERS
import Redis from "ioredis";
import { RateLimiterRedis } from "rate-limiter-flexible";

const [port, concurrency, duration, identifiers] = process.argv.slice(2).map(Number);
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
const started = performance.now();
await Promise.all(Array.from({ length: concurrency }, (_, w) => worker(w)));
const elapsed = (performance.now() - started) / 1000;
latencies.sort((a, b) => a - b);
const pct = (p) => Math.round(latencies[Math.round((latencies.length - 1) * p)] ?? 0);
if (errors) console.log(`rate-limiter-flexible: ${errors} errors`);
console.log(`decisions_per_sec=${Math.round(latencies.length / elapsed)} p50_us=${pct(0.5)} p99_us=${pct(0.99)}`);
redis.disconnect();
