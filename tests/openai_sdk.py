"""The official OpenAI Python SDK against the gateway (started by tests/openai_sdk.rs).

Usage: python tests/openai_sdk.py BASE_URL
Prints one line per check and a closing "N passed, N failed" line; exits 1 on failure.
"""
import sys

import openai

base_url = sys.argv[1]
passed = failed = 0


def check(name, condition, detail=""):
    global passed, failed
    if condition:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


def ask(client, **extra):
    return client.chat.completions.with_raw_response.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "Say hello"}],
        **extra,
    )


# 10 requests per minute: the remaining count goes down, the 11th raises RateLimitError.
client = openai.OpenAI(base_url=base_url, api_key="sk-sdk-requests", max_retries=0)
remaining = []
for _ in range(10):
    raw = ask(client)
    completion = raw.parse()
    remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
check("ten calls pass with usage", completion.usage.prompt_tokens > 0)
check("x-ratelimit-remaining-requests counts down", remaining == list(range(9, -1, -1)), remaining)
try:
    ask(client)
    check("the 11th call raises RateLimitError", False, "no error")
except openai.RateLimitError as e:
    check("the 11th call raises RateLimitError", e.status_code == 429)
    retry_after = int(e.response.headers["retry-after"])
    # Sliding 60 s window: the budget is back within two windows at most.
    check("RateLimitError carries Retry-After", 1 <= retry_after <= 120, retry_after)
    check("the error body is OpenAI-shaped", e.body.get("type") == "rate_limit_exceeded", e.body)

# Streamed calls are charged their usage (another key: another identifier).
client = openai.OpenAI(base_url=base_url, api_key="sk-sdk-stream", max_retries=0)
first = ask(client)
before = int(first.headers["x-ratelimit-remaining-tokens"])
prompt_tokens = first.parse().usage.prompt_tokens
stream = client.chat.completions.create(
    model="gpt-test",
    messages=[{"role": "user", "content": "Say hello"}],
    stream=True,
)
text = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
check("the stream delivers the text", text == "Hello from the mock upstream.", text)
after = int(ask(client).headers["x-ratelimit-remaining-tokens"])
# The plain call and the streamed call each charged their prompt tokens.
check("the streamed call was charged its prompt tokens", after == before - 2 * prompt_tokens, (before, after, prompt_tokens))

with client.chat.completions.create(
    model="gpt-test",
    messages=[{"role": "user", "content": "Say hello"}],
    stream=True,
    stream_options={"include_usage": True},
) as stream:
    usage = [c.usage for c in stream if c.usage is not None]
check("a client that asks for streamed usage gets it", len(usage) == 1 and usage[0].prompt_tokens == prompt_tokens, usage)

print(f"openai sdk: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
