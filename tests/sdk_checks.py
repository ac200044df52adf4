"""The official OpenAI and Anthropic Python SDKs against llm-gateway (started by
tests/openai_sdk.rs). Usage: python tests/sdk_checks.py BASE_URL MODE

MODE is one of:
  responses  - the Responses API (JSON and streamed), compressed answers, a call that
               can never pass, Anthropic's rate-limit error shape.
  keys       - gateway-issued keys: two tiers, unknown and missing keys, both SDKs.

Prints one line per check and a closing "N passed, N failed" line; exits 1 on failure.
"""
import sys

import anthropic
try:
    import httpx
except ImportError:  # openai 3.x and anthropic 2.x ship httpx as httpx2
    import httpx2 as httpx
import openai

base_url, mode = sys.argv[1], sys.argv[2]
root = base_url.removesuffix("/v1")
passed = failed = 0


def check(name, condition, detail=""):
    global passed, failed
    if condition:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


def remaining_tokens(client):
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "x"}], max_tokens=1
    )
    return int(raw.headers["x-ratelimit-remaining-tokens"])


if mode == "responses":
    client = openai.OpenAI(base_url=base_url, api_key="sk-responses", max_retries=0)
    before = remaining_tokens(client)
    after_probe = remaining_tokens(client)
    probe_cost = before - after_probe
    response = client.responses.create(model="gpt-test", input="Say hello")
    check("responses.create returns text", "Hello" in response.output_text, response.output_text)
    used = response.usage.input_tokens + response.usage.output_tokens
    after = remaining_tokens(client)
    check("a Responses call is charged its usage", after_probe - after - probe_cost == used, (after_probe, after, used))

    # A 3,000-token streamed answer: charged in full.
    before = remaining_tokens(client)
    stream = client.responses.create(
        model="gpt-test", input="Say hello", stream=True,
        extra_headers={"x-mock-completion": "3000"},
    )
    usage = None
    for event in stream:
        if event.type == "response.completed":
            usage = event.response.usage
    after = remaining_tokens(client)
    check("the stream completes with usage", usage is not None and usage.output_tokens == 3000, usage)
    if usage is not None:
        charged = before - after - probe_cost
        check("a 3,000-token stream is charged fully", charged == usage.input_tokens + usage.output_tokens, (charged, usage))

    # Compressed answers (the SDK's httpx decodes gzip and br): charged like plain ones.
    for encoding in ["gzip", "br"]:
        before = remaining_tokens(client)
        completion = client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "Say hello"}],
            extra_headers={"x-mock-encoding": encoding},
        )
        after = remaining_tokens(client)
        charged = before - after - probe_cost
        check(f"a {encoding} answer is readable and charged", charged == completion.usage.total_tokens, (charged, completion.usage))

    # A call that can never pass: a 429 the SDK does not retry.
    requests = []
    http_client = httpx.Client(event_hooks={"request": [lambda r: requests.append(r.url)]})
    never = openai.OpenAI(base_url=base_url, api_key="sk-responses", max_retries=3, http_client=http_client)
    try:
        never.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "x"}], max_tokens=10_000_000
        )
        check("a call over the quota raises", False, "no error")
    except openai.RateLimitError as e:
        check("a call over the quota raises RateLimitError", e.status_code == 429)
        check("it says it can never pass", e.body.get("code") == "token_limit_exceeds_quota", e.body)
        check("and the SDK did not retry it", len(requests) == 1, requests)

    # Anthropic: its own error shape, so its SDK raises its own RateLimitError.
    claude = anthropic.Anthropic(base_url=root, api_key="sk-anthropic", max_retries=0)
    message = claude.messages.create(
        model="claude-test", max_tokens=50, messages=[{"role": "user", "content": "Say hello"}]
    )
    check("anthropic messages.create works", message.usage.input_tokens > 0, message.usage)
    try:
        for _ in range(20):
            claude.messages.create(
                model="claude-test", max_tokens=50, messages=[{"role": "user", "content": "Say hello"}]
            )
        check("anthropic calls are rate limited", False, "no error")
    except anthropic.RateLimitError as e:
        body = e.body or {}
        check("anthropic.RateLimitError with Anthropic's body",
              body.get("type") == "error" and body.get("error", {}).get("type") == "rate_limit_error", body)

elif mode == "keys":
    def chat(client):
        return client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "Say hello"}]
        )

    free = openai.OpenAI(base_url=base_url, api_key="gk-free", max_retries=0)
    pro = openai.OpenAI(base_url=base_url, api_key="gk-pro", max_retries=0)
    results = []
    for client, name, quota in [(free, "free", 3), (pro, "pro", 6)]:
        ok = 0
        try:
            for _ in range(quota + 1):
                chat(client)
                ok += 1
            check(f"the {name} key is limited", False, "no 429")
        except openai.RateLimitError as e:
            check(f"the {name} key gets {quota} calls, then RateLimitError", ok == quota and e.status_code == 429, ok)
    streamed = openai.OpenAI(base_url=base_url, api_key="gk-stream", max_retries=0)
    text = "".join(
        (c.choices[0].delta.content or "")
        for c in streamed.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "Say hello"}], stream=True
        )
        if c.choices
    )
    check("a streamed call with a gateway key works", text == "Hello from the mock upstream.", text)
    for key in ["sk-provider-key", "gk-nobody"]:
        try:
            chat(openai.OpenAI(base_url=base_url, api_key=key, max_retries=0))
            check(f"key {key} is refused", False, "no error")
        except openai.AuthenticationError as e:
            check(f"key {key} is refused with AuthenticationError", e.status_code == 401, e.body)
    raw = httpx.post(f"{base_url}/chat/completions", json={"model": "m", "messages": []})
    check("no key: 401 in OpenAI's shape", raw.status_code == 401 and "error" in raw.json(), raw.text)

    claude = anthropic.Anthropic(base_url=root, api_key="gk-stream", max_retries=0)
    message = claude.messages.create(
        model="claude-test", max_tokens=50, messages=[{"role": "user", "content": "Say hello"}]
    )
    check("anthropic with a gateway key works", message.content[0].text.startswith("Hello"), message)
    with claude.messages.stream(
        model="claude-test", max_tokens=50, messages=[{"role": "user", "content": "Say hello"}]
    ) as stream:
        final = stream.get_final_message()
    check("an anthropic stream with a gateway key works", final.usage.output_tokens > 0, final.usage)
    try:
        anthropic.Anthropic(base_url=root, api_key="gk-nobody", max_retries=0).messages.create(
            model="claude-test", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
        check("anthropic refuses an unknown key", False, "no error")
    except anthropic.AuthenticationError as e:
        body = e.body or {}
        check("anthropic.AuthenticationError with Anthropic's body",
              body.get("type") == "error" and body.get("error", {}).get("type") == "authentication_error", body)

print(f"sdk {mode}: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
