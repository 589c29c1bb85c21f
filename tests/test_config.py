"""Tests of proxy.config: what a valid config becomes and how an invalid one is reported."""

from __future__ import annotations

import dataclasses
import hashlib
import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest
from pydantic import ValidationError

from proxy import config as config_module
from proxy.config import (
    PLAN_LIMITS,
    Config,
    ConfigError,
    ListenAddress,
    Problem,
    RateLimitConfig,
    UpstreamConfig,
    credential_warnings,
    default_config_path,
    load_config,
    parse_config,
    parse_duration,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.yaml"

HASH_A = hashlib.sha256(b"cpx_test-token-a").hexdigest()
HASH_B = hashlib.sha256(b"cpx_test-token-b").hexdigest()

# A valid upstream to build the cases on.
UPSTREAM = """\
upstreams:
  api:
    base_url: https://api.example.com/v1
    credentials: [{name: api-key, scopes: [read]}]
"""


def parse(text: str, env: Mapping[str, str] | None = None) -> Config:
    return parse_config(textwrap.dedent(text), env={} if env is None else env)


def problems_of(text: str) -> list[Problem]:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    return caught.value.problems


def marked_line(text: str, marker: str = "#<") -> int:
    """1-based line of the line carrying `marker` in the dedented text."""
    for number, line in enumerate(textwrap.dedent(text).splitlines(), start=1):
        if marker in line:
            return number
    raise AssertionError("no marker in the test config")


# --- the example and the defaults ----------------------------------------------------------


def test_example_config_validates() -> None:
    """config.example.yaml loads without a problem and means what its comments say."""
    config = load_config(EXAMPLE, env={})
    assert config.source == EXAMPLE
    aimychats = config.upstreams["aimychats"]
    assert aimychats.origin == "https://api.aimychats.com"
    assert aimychats.base_path == "/v1"
    assert [c.name for c in aimychats.credentials] == ["aimychats-read", "aimychats-rw"]
    assert aimychats.rate_limit == RateLimitConfig(plan="standard", per_hour=2000, per_minute=100)
    assert set(config.apps) == {"dashboard", "summarizer"}
    summarizer = config.apps["summarizer"]
    assert len(summarizer.token_sha256) == 1 and len(summarizer.token_sha256[0]) == 64
    assert [str(n) for n in summarizer.allow_from] == ["172.18.0.0/16"]
    assert summarizer.upstreams["aimychats"].scopes == {"read", "write"}


def test_example_oauth_block_validates_when_uncommented() -> None:
    """The commented-out oauth block of the example is itself a valid config."""
    lines = EXAMPLE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# oauth:")
    end = start + 1
    while lines[end].startswith("    #   "):
        end += 1
    lines[start:end] = [line.replace("    # ", "    ", 1) for line in lines[start:end]]
    config = parse_config("\n".join(lines), env={})
    oauth = config.upstreams["aimychats"].oauth
    assert oauth is not None and oauth.grant == "authorization_code"
    assert oauth.client_secret == "aimychats-oauth-client"


def test_defaults_follow_spec() -> None:
    """An empty mapping gives SPEC's defaults, and so does a minimal upstream."""
    config = parse("{}", env={"HOME": "/home/alice"})
    assert [str(a) for a in config.listen] == ["127.0.0.1:8787"]
    assert str(config.admin_listen) == "127.0.0.1:8786"
    assert config.store == Path("/home/alice/.local/share/credproxy/store.db")
    assert (config.limits.max_header_bytes, config.limits.max_body_bytes) == (16384, 10485760)
    assert config.limits.replay_buffer_bytes == 1048576
    assert config.upstreams == {} and config.apps == {}
    assert config.state is None and config.source is None

    upstream = parse(UPSTREAM).upstreams["api"]
    assert (upstream.auth_header.name, upstream.auth_header.prefix) == ("Authorization", "Bearer ")
    assert (upstream.queue.max_size, upstream.queue.max_wait) == (1000, 30.0)
    assert (upstream.retries.max, upstream.retries.on_5xx) == (3, "idempotent")
    timeouts = upstream.timeouts
    assert (timeouts.connect, timeouts.idle, timeouts.total) == (5.0, 120.0, None)
    assert upstream.hosts == () and upstream.listen is None and upstream.rate_limit is None


def test_oauth_defaults() -> None:
    """An oauth block gets redirect port 8789 and client_secret_post unless told otherwise."""
    config = parse(
        """\
        upstreams:
          api:
            base_url: https://api.example.com
            oauth:
              grant: authorization_code
              authorize_url: https://auth.example.com/authorize
              token_url: https://auth.example.com/token
              client_id: my-client
              scopes: read write
        """
    )
    oauth = config.upstreams["api"].oauth
    assert oauth is not None
    assert (oauth.redirect_port, oauth.token_auth_method) == (8789, "client_secret_post")
    assert oauth.client_secret is None and oauth.scopes == ("read", "write")


# --- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("30", 30.0),
        (" 30s ", 30.0),
        (45, 45.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration(value: str | int | float, seconds: float) -> None:
    """Durations with ms/s/m/h units, and bare numbers of seconds, become seconds."""
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", ["", "s", "5d", "5 s", "1:30", "-5s", "-1", "inf", "nan", "ten", True]
)
def test_parse_duration_rejects(value: str | int | float) -> None:
    """Unknown units, negative, infinite and non-numeric durations raise ValueError."""
    with pytest.raises(ValueError, match=r"duration"):
        parse_duration(value)


def test_bad_durations_reported_with_path_and_line() -> None:
    """A bad duration in the config names its field and line, and echoes the value."""
    text = (
        UPSTREAM + "    timeouts: {connect: 1s, idle: 2 minutes}  #<\n    queue: {max_wait: -5s}\n"
    )
    found = {p.path: p for p in problems_of(text)}
    idle = found["upstreams.api.timeouts.idle"]
    assert idle.line == marked_line(text) and "'2 minutes'" in idle.message
    assert "negative" in found["upstreams.api.queue.max_wait"].message
    assert found["upstreams.api.queue.max_wait"].line == marked_line(text) + 1


def test_yaml_base_60_numbers_stay_as_written() -> None:
    """YAML 1.1 would read 1:30 as 90; the config sees the text and refuses it as a duration."""
    text = UPSTREAM + "    timeouts: {idle: 1:30}\n"
    (problem,) = problems_of(text)
    assert problem.path == "upstreams.api.timeouts.idle" and "'1:30'" in problem.message


# --- environment variables ------------------------------------------------------------------


def test_env_expansion() -> None:
    """${NAME} is replaced in strings, $${NAME} stays literal, and numbers may come from env."""
    config = parse(
        """\
        upstreams:
          api:
            base_url: ${API_URL}
            credentials: [{name: "${KEY_NAME}", scopes: [read]}]
            auth_header: {name: X-Api-Key, prefix: "$${LITERAL} "}
            retries: {max: "${RETRIES}"}
        """,
        env={"API_URL": "https://api.example.com/v2", "KEY_NAME": "prod-key", "RETRIES": "5"},
    )
    upstream = config.upstreams["api"]
    assert upstream.base_url == "https://api.example.com/v2"
    assert upstream.credentials[0].name == "prod-key"
    assert upstream.auth_header.prefix == "${LITERAL} "
    assert upstream.retries.max == 5


def test_undefined_env_var_is_named_with_path_and_line() -> None:
    """An unset variable is one problem naming it, its path and line, and nothing derived."""
    text = """\
        upstreams:
          api:
            base_url: ${API_URL}  #<
            credentials: [{name: k, scopes: [read]}]
        """
    (problem,) = problems_of(text)
    assert problem.path == "upstreams.api.base_url"
    assert problem.line == marked_line(text)
    assert "API_URL" in problem.message and "not set" in problem.message


# --- every check: right path and right line ---------------------------------------------------

CASES = [
    pytest.param(
        UPSTREAM.replace("https://api", "http://api").replace("v1\n", "v1  #<\n"),
        "upstreams.api.base_url",
        "must be https",
        id="http-base-url",
    ),
    pytest.param(
        UPSTREAM + "    timeout: {idle: 5s}  #<\n",
        "upstreams.api.timeout",
        "unknown key 'timeout' (did you mean 'timeouts'?)",
        id="unknown-key",
    ),
    pytest.param(
        UPSTREAM + "    timeouts: {idle: soon}  #<\n",
        "upstreams.api.timeouts.idle",
        "invalid duration 'soon'",
        id="bad-duration",
    ),
    pytest.param(
        "listen: [127.0.0.1:8787, 127.0.0.1:8790]\n"
        + UPSTREAM
        + "    listen: 127.0.0.1:8790  #<\n",
        "upstreams.api.listen",
        "127.0.0.1:8790 is already used by listen[1] on line 1",
        id="duplicate-listen-upstream",
    ),
    pytest.param(
        "listen: 127.0.0.1:8787\nadmin_listen: localhost:8787  #<\n",
        "admin_listen",
        "localhost:8787 is already used by listen on line 1",
        id="duplicate-listen-admin",
    ),
    pytest.param(
        "listen: 127.0.0.1:8786  #<\n",
        "listen",
        "127.0.0.1:8786 is already used by admin_listen (default)",
        id="duplicate-listen-default-admin",
    ),
    pytest.param(
        "listen:\n  - unix:/run/credproxy/proxy.sock\n  - unix:/run/credproxy//proxy.sock  #<\n",
        "listen[1]",
        "unix:/run/credproxy/proxy.sock is already used by listen[0] on line 2",
        id="duplicate-unix-socket",
    ),
    pytest.param(
        UPSTREAM + "apps:\n  web:\n    upstreams:\n      nope: {scopes: [read]}  #<\n",
        "apps.web.upstreams.nope",
        "no upstream named 'nope' is configured (configured: api)",
        id="app-unknown-upstream",
    ),
    pytest.param(
        UPSTREAM
        + "    hosts: [api.example.com]\n"
        + "  other:\n"
        + "    base_url: https://other.example.com\n"
        + "    credentials: [{name: other-key, scopes: [read]}]\n"
        + "    hosts:\n      - www.example.com\n      - API.Example.com  #<\n",
        "upstreams.other.hosts[1]",
        "host 'api.example.com' is already claimed by upstream 'api'",
        id="host-claimed-twice",
    ),
    pytest.param(
        UPSTREAM.replace("scopes: [read]", "scopes: [read, owner]").replace("]}]\n", "]}]  #<\n"),
        "upstreams.api.credentials[0].scopes[1]",
        "Input should be 'read', 'write', 'delete' or 'admin'",
        id="unknown-scope",
    ),
    pytest.param(
        UPSTREAM + "    path_rules:\n      - {method: post, path: v1/x, scope: read}  #<\n",
        "upstreams.api.path_rules[0].path",
        "must start with '/'",
        id="path-rule-glob",
    ),
    pytest.param(
        UPSTREAM
        + f"apps:\n  a:\n    token_sha256: [{HASH_A}]\n"
        + f"  b:\n    token_sha256: [{HASH_B}, {HASH_A.upper()}]  #<\n",
        "apps.b.token_sha256[1]",
        "app 'a' has the same token hash (apps.a.token_sha256[0] on line 7)",
        id="token-hash-in-two-apps",
    ),
    pytest.param(
        "admin_listen: 0.0.0.0:8786  #<\n",
        "admin_listen",
        "must be a loopback address",
        id="admin-not-loopback",
    ),
    pytest.param(
        "listen: 0.0.0.0:8787  #<\n"
        + UPSTREAM
        + "apps:\n  side:\n    allow_from: [172.18.0.0/16]\n  web: {}\n",
        "listen",
        "0.0.0.0:8787 can be reached from other machines, and these apps accept callers from "
        "any address: web; listen on 127.0.0.1 or a unix: socket, or give every app an "
        "allow_from list",
        id="wildcard-listen-without-allow-from",
    ),
    pytest.param(
        UPSTREAM + "    listen: 192.168.1.10:8788  #<\napps:\n  web: {}\n",
        "upstreams.api.listen",
        "192.168.1.10:8788 can be reached from other machines",
        id="upstream-listen-not-loopback",
    ),
    pytest.param(
        "upstreams:\n  api:  #<\n    base_url: https://api.example.com\n",
        "upstreams.api",
        "needs credentials (names of secrets in the store) or an oauth block",
        id="no-credentials-no-oauth",
    ),
    pytest.param(
        UPSTREAM.replace("scopes: [read]}]", "scopes: []}]  #<"),
        "upstreams.api.credentials[0].scopes",
        "list at least one scope",
        id="credential-without-scopes",
    ),
    pytest.param(
        UPSTREAM
        + "    oauth:  #<\n      grant: authorization_code\n"
        + "      token_url: https://api.example.com/token\n      client_id: c\n",
        "upstreams.api.oauth.authorize_url",
        "required for grant authorization_code",
        id="oauth-without-authorize-url",
    ),
    pytest.param(
        UPSTREAM + "    ca_bundle: /nonexistent/ca.pem  #<\n",
        "upstreams.api.ca_bundle",
        "file not found: /nonexistent/ca.pem",
        id="ca-bundle-missing",
    ),
    pytest.param(
        UPSTREAM + "    rate_limit: {}  #<\n",
        "upstreams.api.rate_limit",
        "set plan, per_hour or per_minute",
        id="rate-limit-empty",
    ),
    pytest.param(
        UPSTREAM.replace("  api:", "  Bad.Name:  #<"),
        "upstreams.Bad.Name",
        "invalid name",
        id="bad-upstream-name",
    ),
    pytest.param(
        "state: {backend: redis}  #<\n",
        "state.url",
        "required when backend is redis",
        id="redis-without-url",
    ),
    pytest.param(
        "listen: 127.0.0.1:8789\n"
        + UPSTREAM
        + "    oauth:\n      grant: authorization_code\n"
        + "      authorize_url: https://api.example.com/authorize\n"
        + "      token_url: https://api.example.com/token\n      client_id: c\n"
        + "      redirect_port: 8789  #<\n",
        "upstreams.api.oauth.redirect_port",
        "port 8789 is also used by listen on line 1; `credproxy login` needs it free",
        id="redirect-port-taken",
    ),
    pytest.param(
        "apps:\n  web:\n    allow_from: [10.0.0.0/8, not-a-network]  #<\n",
        "apps.web.allow_from[1]",
        "must be an IP address or a CIDR network",
        id="bad-allow-from",
    ),
]


@pytest.mark.parametrize(("text", "path", "message"), CASES)
def test_each_check_reports_path_and_line(text: str, path: str, message: str) -> None:
    """Each check yields exactly one problem, at its dotted path and on the marked line."""
    found = problems_of(text)
    assert [p.path for p in found] == [path], found
    assert message in found[0].message
    assert found[0].line == marked_line(text)
    assert found[0].severity == "error"


def test_non_loopback_listen_allowed_when_every_app_has_allow_from() -> None:
    """A sidecar may listen on 0.0.0.0 when every app is bound to source networks."""
    config = parse(
        "listen: 0.0.0.0:8787\n"
        + UPSTREAM
        + "apps:\n  side:\n    allow_from: 172.18.0.0/16\n    upstreams: {api: {scopes: read}}\n"
    )
    assert not config.listen[0].is_loopback()
    assert [str(n) for n in config.apps["side"].allow_from] == ["172.18.0.0/16"]


def test_problem_and_error_text() -> None:
    """A problem reads `path: message (line N)`, and the error prefixes each with the file."""
    text = "upstreams:\n  x:\n    credentials: [{name: k, scopes: [read]}]\n\n\n\n    base_url: http://x.example\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="/etc/credproxy/config.yaml")
    assert str(caught.value.problems[0]) == "upstreams.x.base_url: must be https (line 7)"
    assert str(caught.value) == (
        "/etc/credproxy/config.yaml: upstreams.x.base_url: must be https (line 7)"
    )
    assert caught.value.source == "/etc/credproxy/config.yaml"
    assert str(Problem("", "config is empty")) == "config is empty"


def test_many_problems_reported_at_once() -> None:
    """Field errors, cross-model checks and checks inside one model all come in one error."""
    text = """\
        listen: 127.0.0.1:8787
        admin_listen: 10.1.2.3:8786
        upstreams:
          api:
            base_url: http://api.example.com
            listen: 127.0.0.1:8787
            retries: {max: -1}
        apps:
          web:
            token_sha256: [not-a-hash]
            upstreams: {ghost: {scopes: [read]}}
        """
    found = [(p.path, p.line) for p in problems_of(text)]
    assert found == [
        ("admin_listen", 2),
        ("upstreams.api", 4),  # neither credentials nor oauth, beside its field errors
        ("upstreams.api.base_url", 5),
        ("upstreams.api.listen", 6),
        ("upstreams.api.retries.max", 7),
        ("apps.web.token_sha256[0]", 10),
        ("apps.web.upstreams.ghost", 11),
    ]


# --- YAML itself ------------------------------------------------------------------------------


def test_duplicate_keys_are_errors_with_their_line() -> None:
    """A key written twice in one mapping is refused at its second line."""
    text = UPSTREAM + "    base_url: https://other.example.com  #<\n"
    (problem,) = problems_of(text)
    assert problem.path == "upstreams.api.base_url"
    assert problem.message == "duplicate key 'base_url' (first at line 3)"
    assert problem.line == marked_line(text)


def test_bad_yaml_reports_line_and_column() -> None:
    """Unparseable YAML is one problem with the line and column of the error."""
    (problem,) = problems_of("listen: 127.0.0.1:8787\nupstreams:\n  api: [unclosed\n")
    assert problem.path == ""
    assert problem.message.startswith("invalid YAML: ")
    assert "column" in problem.message
    assert problem.line == 4


def test_control_characters_and_extra_documents_are_yaml_errors() -> None:
    """A control character or a second document is one YAML problem with its line."""
    (problem,) = problems_of("listen: 127.0.0.1:8787\nstore: a\x07b\n")
    assert problem.message == "invalid YAML: control character #x0007 is not allowed"
    assert problem.line == 2
    (problem,) = problems_of("apps: {}\n---\napps: {}\n")
    assert "expected a single document" in problem.message and problem.line == 2


@pytest.mark.parametrize("text", ["", "\n# only a comment\n", "~\n"])
def test_empty_config_is_an_error(text: str) -> None:
    """An empty file is refused rather than read as an all-defaults config."""
    (problem,) = problems_of(text)
    assert problem.message.startswith("config is empty")


def test_non_mapping_document_is_an_error() -> None:
    """A document that is a list or a scalar is refused with one problem."""
    (problem,) = problems_of("- listen\n")
    assert "must be a YAML mapping" in problem.message


def test_unsafe_yaml_tags_are_refused() -> None:
    """Python object tags are never constructed; they are reported, and nothing else."""
    (problem,) = problems_of("store: !!python/object/apply:os.system [echo hi]\n")
    assert problem.path == "store" and "unsupported YAML" in problem.message


def test_anchors_and_x_keys() -> None:
    """Merge keys work, and top-level x-* keys may hold anchors without being unknown keys."""
    config = parse(
        """\
        x-defaults: &defaults
          credentials: [{name: shared, scopes: [read]}]
          timeouts: {idle: 5m}
        upstreams:
          one: {<<: *defaults, base_url: https://one.example.com}
          two: {<<: *defaults, base_url: https://two.example.com}
        """
    )
    assert config.upstreams["two"].timeouts.idle == 300.0
    assert config.upstreams["one"].credentials[0].name == "shared"


def test_alias_bomb_is_refused() -> None:
    """Nested aliases that would expand without bound are refused instead of eating memory."""
    rows = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for level in "bcdef":
        previous = chr(ord(level) - 1)
        rows.append(f"{level}: &{level} [" + ", ".join([f"*{previous}"] * 10) + "]")
    (problem,) = problems_of("\n".join(rows) + "\n")
    assert "too many YAML nodes" in problem.message


# --- values and their normal form ----------------------------------------------------------


def test_listen_address_forms() -> None:
    """Listen addresses parse from their config forms and print back the same way."""
    for text, kind, host, port, path in [
        ("127.0.0.1:8787", "tcp", "127.0.0.1", 8787, None),
        ("[::1]:8787", "tcp", "::1", 8787, None),
        ("LOCALHOST:8787", "tcp", "localhost", 8787, None),
        ("unix:/run/credproxy/proxy.sock", "unix", None, None, "/run/credproxy/proxy.sock"),
    ]:
        address = ListenAddress.parse(text)
        assert (address.kind, address.host, address.port, address.path) == (kind, host, port, path)
        assert address.is_loopback()
        assert str(address) == text.replace("LOCALHOST", "localhost")
    for text in ["0.0.0.0:8787", "[::]:8787", "10.0.0.1:8787", "proxy.internal:8787"]:
        assert not ListenAddress.parse(text).is_loopback()
    assert ListenAddress.parse("127.0.0.2:1").is_loopback()
    for bad in ["8787", "127.0.0.1", "::1:8787", ":8787", "127.0.0.1:70000", "unix:rel.sock"]:
        with pytest.raises(ValidationError):
            ListenAddress.parse(bad)


def test_upstream_url_parts() -> None:
    """base_url loses a trailing slash and :443; origin, host, port and base_path follow it."""
    config = parse(
        """\
        upstreams:
          a:
            base_url: https://API.Example.com:443/v1/
            credentials: [{name: k, scopes: [read]}]
            hosts: [API.Example.com]
          b:
            base_url: https://10.0.0.5:8443
            credentials: [{name: k, scopes: [read]}]
        """
    )
    a, b = config.upstreams["a"], config.upstreams["b"]
    assert a.base_url == "https://api.example.com/v1"
    assert (a.origin, a.host, a.port, a.base_path) == (
        "https://api.example.com",
        "api.example.com",
        443,
        "/v1",
    )
    assert a.hosts == ("api.example.com",)
    assert (b.origin, b.port, b.base_path) == ("https://10.0.0.5:8443", 8443, "")


@pytest.mark.parametrize(
    ("base_url", "message"),
    [
        ("http://api.example.com", "must be https"),
        ("ftp://api.example.com", "must be an https:// URL"),
        ("https://api.example.com/v1?x=1", "must not have a ?query"),
        ("https://api.example.com/v1#top", "must not have a #fragment"),
        ("https://user:hunter2@api.example.com", "must not contain user:password@"),
    ],
)
def test_base_url_rules(base_url: str, message: str) -> None:
    """base_url must be a plain https URL; the message never repeats a password in it."""
    text = UPSTREAM.replace("https://api.example.com/v1", f"'{base_url}'")
    (problem,) = problems_of(text)
    assert problem.path == "upstreams.api.base_url" and message in problem.message
    assert "hunter2" not in str(problem)


def test_token_hashes_are_normalized_and_tokens_refused_without_echo() -> None:
    """Uppercase hashes are lowercased; a pasted token is refused and never printed."""
    config = parse(f"apps:\n  web:\n    token_sha256: {HASH_A.upper()}\n")
    assert config.apps["web"].token_sha256 == (HASH_A,)
    token = "cpx_" + "S3cr3t" * 8
    with pytest.raises(ConfigError) as caught:
        parse(f"apps:\n  web:\n    token_sha256: [{token}]\n")
    assert "app token, not its hash" in str(caught.value)
    assert "S3cr3t" not in str(caught.value)


def test_secret_values_never_echoed() -> None:
    """Problems about fields that may hold secrets do not repeat the value."""
    with pytest.raises(ConfigError) as caught:
        parse(
            """\
            state: {backend: redis, url: "http://:hunter2@redis:6379"}
            upstreams:
              api:
                base_url: https://api.example.com
                credentials: [{name: "sk live hunter2", scopes: [read]}]
            """
        )
    assert len(caught.value.problems) == 2
    assert "hunter2" not in str(caught.value)


def test_plan_figures() -> None:
    """A plan fills both windows from the seed table; explicit figures override it."""
    assert dict(PLAN_LIMITS) == {
        "free": (100, 10),
        "starter": (500, 50),
        "standard": (2000, 100),
        "pro": (10000, 500),
    }
    for plan, (per_hour, per_minute) in PLAN_LIMITS.items():
        limit = RateLimitConfig(plan=plan)
        assert (limit.per_hour, limit.per_minute) == (per_hour, per_minute)
    assert RateLimitConfig(plan="pro", per_minute=20).per_minute == 20
    assert RateLimitConfig(per_hour=60) == RateLimitConfig(plan=None, per_hour=60, per_minute=None)
    with pytest.raises(ValidationError):
        RateLimitConfig()


def test_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    """A relative store or ca_bundle is taken from the config file's directory."""
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        "store: data/store.db\n" + UPSTREAM + "    ca_bundle: ca.pem\n", encoding="utf-8"
    )
    config = load_config(config_file, env={})
    assert config.store == tmp_path / "data" / "store.db"
    assert config.upstreams["api"].ca_bundle == tmp_path / "ca.pem"
    assert config.source == config_file


def test_source_is_set_by_the_loader_only() -> None:
    """`source` cannot be written in the YAML: it records where the config came from."""
    (problem,) = problems_of("source: /etc/passwd\n")
    assert problem.path == "source" and "unknown key" in problem.message


def test_frozen() -> None:
    """Configs are immutable values: assigning to any part raises."""
    config = parse(UPSTREAM)
    with pytest.raises(ValidationError):
        config.store = Path("/tmp/other.db")
    with pytest.raises(ValidationError):
        config.upstreams["api"].base_url = "https://evil.example"
    with pytest.raises(ValidationError):
        config.listen[0].port = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        Problem("a", "b").line = 3  # type: ignore[misc]


def test_models_check_themselves_when_built_in_code() -> None:
    """Built without the loader, an upstream still refuses to lack both credentials and oauth."""
    with pytest.raises(ValidationError, match="needs credentials"):
        UpstreamConfig(base_url="https://api.example.com")


# --- loading files --------------------------------------------------------------------------


def test_missing_file_says_how_to_fix(tmp_path: Path) -> None:
    """A missing config file is one problem that points at `credproxy init`."""
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.yaml")
    (problem,) = caught.value.problems
    assert "credproxy init" in problem.message
    assert caught.value.source == str(tmp_path / "nope.yaml")


def test_unreadable_files_are_one_problem(tmp_path: Path) -> None:
    """A directory or a file that is not UTF-8 is refused with one clear problem."""
    with pytest.raises(ConfigError, match="directory"):
        load_config(tmp_path)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("listen: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(latin1)


def test_credential_warnings() -> None:
    """Credentials and client secrets absent from the store are warnings with path and line."""
    text = """\
        upstreams:
          api:
            base_url: https://api.example.com
            credentials:
              - {name: present, scopes: [read]}
              - {name: absent, scopes: [write]}
            oauth:
              grant: client_credentials
              token_url: https://api.example.com/token
              client_id: c
              client_secret: oauth-secret
        """
    warnings = credential_warnings(parse(text), {"present"})
    assert [(w.path, w.line, w.severity) for w in warnings] == [
        ("upstreams.api.credentials[1].name", 6, "warning"),
        ("upstreams.api.oauth.client_secret", 11, "warning"),
    ]
    assert "credproxy keys add absent" in warnings[0].message
    assert credential_warnings(parse(text), {"present", "absent", "oauth-secret"}) == []


def test_default_config_path_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$CREDPROXY_CONFIG wins; else the user file, the system file, then the user path."""
    home = tmp_path / "home"
    user = home / ".config" / "credproxy" / "config.yaml"
    system = tmp_path / "etc" / "credproxy" / "config.yaml"
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG_PATH", system)
    env = {"HOME": str(home)}

    assert default_config_path(env) == user
    system.parent.mkdir(parents=True)
    system.write_text("{}\n")
    assert default_config_path(env) == system
    user.parent.mkdir(parents=True)
    user.write_text("{}\n")
    assert default_config_path(env) == user
    explicit = tmp_path / "elsewhere.yaml"
    assert default_config_path({**env, "CREDPROXY_CONFIG": str(explicit)}) == explicit
