//! The configuration: a TOML file (`--config`), command-line flags over its scalars, and
//! the checks that turn either into a [`Settings`] the gateway runs on. A bad value is
//! an error naming the field.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

/// The command line.
#[derive(Parser, Debug, Clone, Default)]
#[command(
    name = "llm-gateway",
    version,
    about = "An OpenAI- and Anthropic-compatible rate-limiting proxy.",
    long_about = "An OpenAI- and Anthropic-compatible rate-limiting proxy. With no arguments it \
serves a built-in mock upstream on the in-memory store, with 10 requests and 10,000 tokens per \
minute per API key."
)]
pub struct Cli {
    /// A TOML config file; flags override its scalar settings.
    #[arg(long, value_name = "FILE")]
    pub config: Option<String>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Upstream base URL, e.g. https://api.openai.com/v1 [default: the built-in mock].
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
    /// Trust this CA (PEM) for an https:// upstream instead of the web PKI roots.
    #[arg(long, value_name = "PEM")]
    pub upstream_ca: Option<String>,
    /// Redis URL (redis:// or rediss://) [default: in memory].
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// A request limit named "requests": this many requests per window.
    #[arg(long, value_name = "N")]
    pub requests: Option<u64>,
    /// A token limit named "tokens": this many tokens per window.
    #[arg(long, value_name = "N")]
    pub tokens: Option<u64>,
    /// The window of --requests and --tokens: seconds, or a duration like 1m [default: 60].
    #[arg(long, value_name = "DURATION")]
    pub window: Option<String>,
    /// The algorithm of --requests and --tokens: fixed, sliding or bucket [default: fixed].
    #[arg(long, value_name = "NAME")]
    pub algorithm: Option<String>,
    /// Token limits count prompt + completion tokens (default: prompt only).
    #[arg(long)]
    pub include_output_tokens: bool,
    /// Reserve each call's estimate before it runs (a hard cap) instead of checking
    /// that tokens remain.
    #[arg(long)]
    pub reserve: bool,
    /// Identify callers by this header (only behind a trusted proxy that sets it)
    /// instead of their hashed API key.
    #[arg(long, value_name = "NAME")]
    pub identifier_header: Option<String>,
    /// When the store fails: closed (503), open (let calls through) or local (decide in
    /// this process) [default: closed].
    #[arg(long, value_name = "POLICY")]
    pub on_store_error: Option<String>,
    /// How long a store call may take before it counts as failed [default: 1s].
    #[arg(long, value_name = "DURATION")]
    pub store_timeout: Option<String>,
    /// Key prefix in the store [default: gateway].
    #[arg(long, value_name = "P")]
    pub prefix: Option<String>,
    /// A concurrency limit named "concurrency": calls in flight per identifier.
    #[arg(long, value_name = "N")]
    pub concurrency: Option<u64>,
    /// Enables /admin with this bearer token (also LLM_GATEWAY_ADMIN_TOKEN).
    #[arg(long, value_name = "TOKEN")]
    pub admin_token: Option<String>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Read a key from stdin and print its `sha256 = "…"` line for a [[keys]] entry.
    HashKey,
    /// Print a new random gateway key and its `sha256 = "…"` line.
    GenKey,
}

/// The config file, as written.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub upstream_ca: Option<String>,
    pub upstream_api_key_env: Option<String>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamFile>,
    pub redis: Option<String>,
    pub identifier: Option<String>,
    pub on_store_error: Option<String>,
    pub store_timeout: Option<String>,
    pub token_mode: Option<String>,
    pub admin_token: Option<String>,
    pub prefix: Option<String>,
    pub include_output_tokens: Option<bool>,
    pub group_states: Option<bool>,
    pub shutdown_grace: Option<String>,
    #[serde(default)]
    pub limits: Vec<LimitFile>,
    #[serde(default)]
    pub tiers: BTreeMap<String, TierFile>,
    #[serde(default)]
    pub keys: Vec<KeyFile>,
}

/// `[upstreams.openai]` / `[upstreams.anthropic]`.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    pub url: Option<String>,
    pub api_key_env: Option<String>,
}

/// One `[[limits]]` entry.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct LimitFile {
    pub name: String,
    pub kind: String,
    pub quota: i64,
    pub window: Option<String>,
    pub algorithm: Option<String>,
    pub count: Option<String>,
    #[serde(default)]
    pub per_model: bool,
    #[serde(default)]
    pub models: Vec<String>,
}

/// One `[tiers.NAME]` entry.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct TierFile {
    #[serde(default)]
    pub identifiers: Vec<String>,
    #[serde(default)]
    pub quotas: BTreeMap<String, i64>,
}

/// One `[[keys]]` entry: a gateway-issued client key.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub name: String,
    pub sha256: String,
    pub tier: Option<String>,
}

/// How callers are identified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// The hashed API key (Bearer or x-api-key); with [[keys]], the key's name.
    ApiKey,
    /// A header a trusted proxy sets.
    Header(String),
}

/// Where one API's calls go and with which credential.
#[derive(Clone, Debug, Default)]
pub struct UpstreamTarget {
    /// `None`: the built-in mock.
    pub url: Option<String>,
    /// The credential the gateway sends (read from the environment at startup).
    pub api_key: Option<String>,
}

/// A limit, checked.
#[derive(Clone, Debug)]
pub struct LimitSpec {
    pub name: String,
    pub kind: String,
    pub quota: u64,
    pub window: Duration,
    pub algorithm: String,
    pub count: String,
    pub per_model: bool,
    pub models: Vec<String>,
}

/// A gateway key, checked: the hex SHA-256 decoded.
#[derive(Clone, Debug)]
pub struct Key {
    pub name: String,
    pub sha256: [u8; 32],
    pub tier: Option<String>,
}

/// Everything the gateway runs on.
#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub openai: UpstreamTarget,
    pub anthropic: UpstreamTarget,
    pub upstream_ca: Option<String>,
    pub redis: Option<String>,
    pub identity: Identity,
    pub on_store_error: String,
    pub store_timeout: Duration,
    pub reserve: bool,
    pub include_output_tokens: bool,
    pub admin_token: Option<String>,
    pub prefix: String,
    /// On Redis: the limits every call has share one value per identifier (see
    /// `RatelimitLayerBuilder::group_states`).
    pub group_states: bool,
    pub shutdown_grace: Duration,
    pub limits: Vec<LimitSpec>,
    /// Tier name → (limit name → quota).
    pub tiers: BTreeMap<String, BTreeMap<String, u64>>,
    /// Identifier → tier name.
    pub tier_of: BTreeMap<String, String>,
    pub keys: Vec<Key>,
}

/// A configuration error: the field and what is wrong with it.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(message.into()))
}

/// A duration: `500ms`, `10s`, `1m`, `1d`, or bare seconds.
pub fn duration(field: &str, value: &str) -> Result<Duration, ConfigError> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(value).or_else(|e| {
        err(format!(
            "{field}: {value:?} is not a duration like 500ms, 10s, 1m or 1d ({e})"
        ))
    })
}

fn one_of(field: &str, value: &str, allowed: &[&str]) -> Result<String, ConfigError> {
    if allowed.contains(&value) {
        Ok(value.to_owned())
    } else {
        err(format!(
            "{field}: {value:?} is not one of {}",
            allowed.join(", ")
        ))
    }
}

/// Read and check the config file at `path`.
pub fn read_file(path: &str) -> Result<File, ConfigError> {
    let text = std::fs::read_to_string(path)
        .or_else(|e| err(format!("--config {path}: cannot read it: {e}")))?;
    toml::from_str(&text).or_else(|e| err(format!("{path}: {e}")))
}

/// `env(name)`: how the environment is read (tests pass their own).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Merge the file and the flags (flags win) and check everything.
pub fn settings(cli: &Cli, file: File, env: Env<'_>) -> Result<Settings, ConfigError> {
    let pick = |flag: &Option<String>, file: &Option<String>| flag.clone().or(file.clone());
    let listen = pick(&cli.listen, &file.listen).unwrap_or_else(|| "127.0.0.1:8080".into());
    let listen = listen
        .parse()
        .or_else(|e| err(format!("listen: {listen:?} is not an address: {e}")))?;
    let on_store_error = one_of(
        "on_store_error",
        &pick(&cli.on_store_error, &file.on_store_error).unwrap_or_else(|| "closed".into()),
        &["closed", "open", "local"],
    )?;
    let store_timeout = duration(
        "store_timeout",
        &pick(&cli.store_timeout, &file.store_timeout).unwrap_or_else(|| "1s".into()),
    )?;
    if store_timeout.is_zero() {
        return err("store_timeout: must be more than 0");
    }
    let shutdown_grace = duration(
        "shutdown_grace",
        file.shutdown_grace.as_deref().unwrap_or("30s"),
    )?;
    let token_mode = one_of(
        "token_mode",
        file.token_mode.as_deref().unwrap_or("check"),
        &["check", "reserve"],
    )?;
    let identity = match (&cli.identifier_header, &file.identifier) {
        (Some(h), _) => Identity::Header(h.clone()),
        (None, None) => Identity::ApiKey,
        (None, Some(i)) if i == "api-key" => Identity::ApiKey,
        (None, Some(i)) => match i.strip_prefix("header:") {
            Some(h) if !h.is_empty() => Identity::Header(h.to_owned()),
            _ => {
                return err(format!(
                    "identifier: {i:?} is not \"api-key\" or \"header:<name>\""
                ));
            }
        },
    };
    if let Identity::Header(h) = &identity
        && http::HeaderName::try_from(h.as_str()).is_err()
    {
        return err(format!("identifier: {h:?} is not a header name"));
    }
    let admin_token = pick(&cli.admin_token, &file.admin_token)
        .or_else(|| env("LLM_GATEWAY_ADMIN_TOKEN"))
        .filter(|t| !t.is_empty());

    // Upstreams and their credentials.
    let default_url = pick(&cli.upstream, &file.upstream);
    let target = |api: &str| -> Result<UpstreamTarget, ConfigError> {
        let section = file.upstreams.get(api).cloned().unwrap_or_default();
        let url = section.url.or(default_url.clone());
        let env_name = section.api_key_env.or(file.upstream_api_key_env.clone());
        let api_key = match env_name {
            None => None,
            Some(name) => match env(&name) {
                Some(v) if !v.is_empty() => Some(v),
                _ => {
                    return err(format!(
                        "upstreams.{api}.api_key_env: the environment variable {name} is not set"
                    ));
                }
            },
        };
        Ok(UpstreamTarget { url, api_key })
    };
    for api in file.upstreams.keys() {
        if api != "openai" && api != "anthropic" {
            return err(format!("upstreams.{api}: only openai and anthropic exist"));
        }
    }
    let openai = target("openai")?;
    let anthropic = target("anthropic")?;

    // Limits: the file's, then the flags' shorthands.
    let mut limits = Vec::new();
    for (i, l) in file.limits.iter().enumerate() {
        let at = format!("limits[{i}] ({:?})", l.name);
        let kind = one_of(
            &format!("{at}.kind"),
            &l.kind,
            &["requests", "tokens", "concurrency"],
        )?;
        if l.quota <= 0 {
            return err(format!(
                "{at}.quota: {} must be a whole number above 0",
                l.quota
            ));
        }
        let window = duration(&format!("{at}.window"), l.window.as_deref().unwrap_or("1m"))?;
        let algorithm = one_of(
            &format!("{at}.algorithm"),
            l.algorithm.as_deref().unwrap_or("fixed"),
            &["fixed", "sliding", "bucket"],
        )?;
        let count = one_of(
            &format!("{at}.count"),
            l.count.as_deref().unwrap_or("prompt"),
            &["prompt", "total"],
        )?;
        if l.count.is_some() && kind != "tokens" {
            tracing::warn!("{at}.count is ignored: only token limits count tokens");
        }
        check_limit(&at, &kind, l.quota as u64, window)?;
        if limits.iter().any(|x: &LimitSpec| x.name == l.name) {
            return err(format!("limits: the name {:?} is used twice", l.name));
        }
        limits.push(LimitSpec {
            name: l.name.clone(),
            kind,
            quota: l.quota as u64,
            window,
            algorithm,
            count,
            per_model: l.per_model,
            models: l.models.clone(),
        });
    }
    let window = duration("--window", cli.window.as_deref().unwrap_or("60"))?;
    let algorithm = one_of(
        "--algorithm",
        cli.algorithm.as_deref().unwrap_or("fixed"),
        &["fixed", "sliding", "bucket"],
    )?;
    let mut shorthand = |name: &str, kind: &str, quota: Option<u64>| -> Result<(), ConfigError> {
        let Some(quota) = quota else { return Ok(()) };
        if quota == 0 {
            return err(format!("--{name}: must be above 0"));
        }
        if limits.iter().any(|x| x.name == name) {
            return err(format!(
                "--{name}: a limit named {name:?} is already in the config file"
            ));
        }
        limits.push(LimitSpec {
            name: name.into(),
            kind: kind.into(),
            quota,
            window: if kind == "concurrency" {
                // A slot outlives its call by at most this lease if the gateway dies.
                Duration::from_secs(600)
            } else {
                window
            },
            algorithm: algorithm.clone(),
            count: "prompt".into(),
            per_model: false,
            models: Vec::new(),
        });
        Ok(())
    };
    let none_given = file.limits.is_empty()
        && cli.requests.is_none()
        && cli.tokens.is_none()
        && cli.concurrency.is_none();
    if none_given {
        // The offline demo: both kinds of limit, per API key.
        shorthand("requests", "requests", Some(10))?;
        shorthand("tokens", "tokens", Some(10_000))?;
    } else {
        shorthand("requests", "requests", cli.requests)?;
        shorthand("tokens", "tokens", cli.tokens)?;
        shorthand("concurrency", "concurrency", cli.concurrency)?;
    }

    // Keys.
    let mut keys = Vec::new();
    for (i, k) in file.keys.iter().enumerate() {
        let at = format!("keys[{i}] ({:?})", k.name);
        if k.name.is_empty() {
            return err(format!("keys[{i}].name: must not be empty"));
        }
        let Some(sha256) = decode_hex32(&k.sha256) else {
            return err(format!("{at}.sha256: not 64 hex digits"));
        };
        if keys.iter().any(|x: &Key| x.name == k.name) {
            return err(format!("keys: the name {:?} is used twice", k.name));
        }
        if let Some(t) = &k.tier
            && !file.tiers.contains_key(t)
        {
            return err(format!("{at}.tier: no tier named {t:?}"));
        }
        keys.push(Key {
            name: k.name.clone(),
            sha256,
            tier: k.tier.clone(),
        });
    }

    // Tiers.
    let mut tiers = BTreeMap::new();
    let mut tier_of = BTreeMap::new();
    for (name, tier) in &file.tiers {
        let mut quotas = BTreeMap::new();
        for (limit, quota) in &tier.quotas {
            if !limits.iter().any(|l| &l.name == limit) {
                return err(format!(
                    "tiers.{name}.quotas.{limit}: no limit named {limit:?}"
                ));
            }
            if *quota < 0 {
                return err(format!("tiers.{name}.quotas.{limit}: {quota} is negative"));
            }
            quotas.insert(limit.clone(), *quota as u64);
        }
        tiers.insert(name.clone(), quotas);
        for id in &tier.identifiers {
            tier_of.insert(id.clone(), name.clone());
        }
    }
    for k in &keys {
        if let Some(t) = &k.tier {
            tier_of.insert(k.name.clone(), t.clone());
        }
    }

    // The provider's credential must not become everyone's: with it, the gateway needs
    // its own keys (or a trusted proxy in front that sets the identifier header).
    let provider_key = openai.api_key.is_some() || anthropic.api_key.is_some();
    if provider_key && keys.is_empty() && identity == Identity::ApiKey {
        return err(
            "upstream_api_key_env: with the gateway's own provider key, clients need gateway keys \
             ([[keys]]); otherwise any made-up key would spend the provider key's budget",
        );
    }
    for (api, target) in [("openai", &openai), ("anthropic", &anthropic)] {
        if !keys.is_empty() && target.url.is_some() && target.api_key.is_none() {
            return err(format!(
                "upstreams.{api}.api_key_env: with [[keys]], the gateway sends its own provider \
                 key upstream (clients' keys are gateway keys); set upstream_api_key_env"
            ));
        }
        if let Some(url) = &target.url {
            let ok = url.parse::<http::Uri>().ok().is_some_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            });
            if !ok {
                return err(format!(
                    "upstream: {url:?} is not an http:// or https:// URL"
                ));
            }
        }
    }
    let upstream_ca = pick(&cli.upstream_ca, &file.upstream_ca);
    if let Some(ca) = &upstream_ca
        && std::fs::metadata(ca).is_err()
    {
        return err(format!("upstream_ca: cannot read {ca:?}"));
    }
    let redis = pick(&cli.redis, &file.redis);
    if let Some(url) = &redis {
        for node in url.split(',') {
            if !(node.trim().starts_with("redis://") || node.trim().starts_with("rediss://")) {
                return err(format!(
                    "redis: {node:?} is not a redis:// or rediss:// URL"
                ));
            }
        }
    }
    let reserve = cli.reserve || token_mode == "reserve";
    let include_output_tokens =
        cli.include_output_tokens || file.include_output_tokens == Some(true);
    let has_tokens = limits.iter().any(|l| l.kind == "tokens");
    if reserve && !has_tokens {
        return err("token_mode: reserve needs a token limit");
    }
    Ok(Settings {
        listen,
        openai,
        anthropic,
        upstream_ca,
        redis,
        identity,
        on_store_error,
        store_timeout,
        reserve,
        include_output_tokens: include_output_tokens && has_tokens,
        admin_token,
        prefix: pick(&cli.prefix, &file.prefix).unwrap_or_else(|| "gateway".into()),
        group_states: file.group_states.unwrap_or(true),
        shutdown_grace,
        limits,
        tiers,
        tier_of,
        keys,
    })
}

/// A limit's quota and window within what the crate accepts.
fn check_limit(at: &str, kind: &str, quota: u64, window: Duration) -> Result<(), ConfigError> {
    use tower_llm_ratelimit::algorithm::{MAX_UNITS, MAX_WINDOW, MIN_WINDOW};
    if quota > MAX_UNITS {
        return err(format!(
            "{at}.quota: {quota} is more than the maximum of {MAX_UNITS}"
        ));
    }
    if window < MIN_WINDOW || window > MAX_WINDOW {
        let what = if kind == "concurrency" {
            "lease"
        } else {
            "window"
        };
        return err(format!(
            "{at}.window: the {what} must be between {MIN_WINDOW:?} and {} days",
            MAX_WINDOW.as_secs() / 86_400
        ));
    }
    Ok(())
}

/// 64 hex digits → 32 bytes.
pub fn decode_hex32(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

/// Load the settings from the command line (and the file it names).
pub fn load(cli: &Cli) -> Result<Settings, ConfigError> {
    let file = match &cli.config {
        Some(path) => read_file(path)?,
        None => File::default(),
    };
    settings(cli, file, &|name| std::env::var(name).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
listen = "127.0.0.1:8080"
upstream = "https://api.openai.com/v1"
redis = "redis://127.0.0.1:6379/"
identifier = "api-key"
on_store_error = "closed"
store_timeout = "1s"
token_mode = "check"
admin_token = "secret"

[[limits]]
name = "rpm"
kind = "requests"
quota = 60
window = "1m"
algorithm = "sliding"
count = "total"
per_model = true
models = ["gpt-4o*"]

[tiers.pro]
identifiers = ["alice"]
quotas = { rpm = 600 }
"#;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        settings(&Cli::default(), file, &|_| None)
    }

    #[test]
    fn the_documented_example_parses() {
        let s = parse(EXAMPLE).unwrap();
        assert_eq!(s.limits.len(), 1);
        assert_eq!(s.limits[0].window, Duration::from_secs(60));
        assert_eq!(s.tiers["pro"]["rpm"], 600);
        assert_eq!(s.tier_of["alice"], "pro");
        assert!(s.group_states, "grouped by default");
        let s =
            parse(&EXAMPLE.replace("admin_token", "group_states = false\nadmin_token")).unwrap();
        assert!(!s.group_states);
    }

    #[test]
    fn bad_fields_are_named() {
        for (from, to, field) in [
            ("kind = \"requests\"", "kind = \"apples\"", "kind"),
            ("quota = 60", "quota = -5", "quota"),
            ("window = \"1m\"", "window = \"soon\"", "window"),
            (
                "quotas = { rpm = 600 }",
                "quotas = { rps = 600 }",
                "tiers.pro.quotas.rps",
            ),
        ] {
            let text = EXAMPLE.replace("count = \"total\"\n", "").replace(from, to);
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
        let twice = format!(
            "{}\n[[limits]]\nname = \"rpm\"\nkind = \"requests\"\nquota = 1\n",
            EXAMPLE.replace("count = \"total\"\n", "")
        );
        assert!(parse(&twice).unwrap_err().to_string().contains("twice"));
        assert!(
            parse("unknown = 1")
                .unwrap_err()
                .to_string()
                .contains("unknown")
        );
    }
}
