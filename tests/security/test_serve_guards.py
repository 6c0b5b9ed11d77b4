"""The serve side's guards, without Ray: the bind-address rule, tokens, Host and cross-site checks,
script escaping, the default guidance bound and the bounded multipart parser."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from twinflow.config import ConfigError
from twinflow.serve import exposure
from twinflow.serve.images import parse_multipart
from twinflow.serve.uploads import FormLimits, FormTooLarge, StreamingForm

BOUNDARY = "xyzzy"
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"


def _plan(**args) -> dict:
    return {"applications": [{"name": "app", "args": {"models": [{"id": "m", "path": "/x"}], **args}}]}


def test_open_non_loopback_bind_refuses_to_start_before_ray(monkeypatch, caplog):
    import ray

    from twinflow.serve.cli import serve_plan

    def no_ray(*a, **k):
        raise AssertionError("Ray was started for a plan that must be refused")

    monkeypatch.setattr(ray, "init", no_ray)
    # a session cluster may already be up (earlier integration tests): the plan must still go through
    # ray.init here, never on to serve.start on the shared cluster
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("TWINFLOW_SERVE_TOKEN", raising=False)
    for host in ("0.0.0.0", "10.1.2.3", "::", "my-host.example"):
        with pytest.raises(ConfigError, match="not loopback"):
            serve_plan(_plan(), host=host)
    with pytest.raises(ConfigError, match="auth is 'token'"):
        serve_plan(_plan(auth="token"), host="127.0.0.1")
    # loopback without a token, a token, or an explicit auth: none pass the check (and reach Ray)
    for plan, host, env in (
        (_plan(), "127.0.0.1", None),
        (_plan(), "0.0.0.0", " tok "),
        (_plan(auth="none"), "0.0.0.0", None),
    ):
        if env:
            monkeypatch.setenv("TWINFLOW_SERVE_TOKEN", env)
        else:
            monkeypatch.delenv("TWINFLOW_SERVE_TOKEN", raising=False)
        with caplog.at_level(logging.WARNING), pytest.raises(AssertionError, match="Ray was started"):
            serve_plan(plan, host=host)
    assert "auth: none" in caplog.text and "0.0.0.0" in caplog.text


def test_loopback_and_allowed_hosts():
    assert all(exposure.is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost"))
    assert not any(exposure.is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "evil.example"))
    loop = exposure.default_allowed_hosts("127.0.0.1")
    assert exposure.host_allowed("127.0.0.1:8000", loop) and exposure.host_allowed("localhost", loop)
    assert exposure.host_allowed("[::1]:8000", loop)
    # a DNS-rebinding page reaches 127.0.0.1 under its own name
    assert not exposure.host_allowed("rebind.attacker.example:8000", loop)
    assert not exposure.host_allowed(None, loop)
    assert exposure.host_allowed("anything:1", exposure.default_allowed_hosts("0.0.0.0"))
    assert exposure.host_allowed("api.example:443", ["api.example"])
    assert not exposure.host_allowed("api.example.evil:443", ["api.example"])


def test_cross_site_detection():
    host = "127.0.0.1:8000"
    assert exposure.cross_site({"origin": "https://evil.example"}, host)
    assert exposure.cross_site({"sec-fetch-site": "cross-site"}, host)
    assert exposure.cross_site({"origin": "null"}, host)
    assert not exposure.cross_site({"origin": "http://127.0.0.1:8000"}, host)
    assert not exposure.cross_site({"sec-fetch-site": "same-origin"}, host)
    assert not exposure.cross_site({}, host)  # curl, scripts: no Origin


def test_tokens_are_compared_after_the_same_normalisation():
    assert exposure.tokens_match(" s3cret\n", "s3cret ")
    assert exposure.tokens_match("s3cret", "\ts3cret\n")  # a token file's newline in the variable
    assert not exposure.tokens_match("s3cre", "s3cret")
    assert not exposure.tokens_match("", "") and not exposure.tokens_match(None, " ")
    assert exposure.normalise_token("  \n") is None


def test_script_string_cannot_end_the_script_element():
    text = exposure.script_string('</script><script>alert(1)</script><!-- \u2028"')
    assert "<" not in text and ">" not in text and "\u2028" not in text
    import json

    assert json.loads(text) == '</script><script>alert(1)</script><!-- \u2028"'
    headers = exposure.page_headers("n0nce")
    csp = headers["Content-Security-Policy"]
    assert "script-src 'nonce-n0nce'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]


def _body(parts: list[tuple[str, bytes, str | None]]) -> bytes:
    out = b""
    for name, data, filename in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def test_multipart_caps_refuse_a_100k_part_body_fast():
    """100,000 one-byte parts (the stdlib parser took minutes on fewer): refused at part 17."""
    body = _body([(f"f{i}", b"x", None) for i in range(100_000)])
    t0 = time.perf_counter()
    with pytest.raises(FormTooLarge, match="more than 16 form parts"):
        form = StreamingForm(CTYPE, FormLimits())
        for i in range(0, len(body), 65536):  # as the server feeds it: chunk by chunk
            form.feed(body[i : i + 65536])
    assert time.perf_counter() - t0 < 5  # generous: the refusal comes within the first chunk


def test_multipart_caps_on_fields_headers_and_files():
    limits = FormLimits(
        max_parts=4, max_field_bytes=10, max_file_bytes=100, max_headers=3, max_header_bytes=64
    )
    with pytest.raises(FormTooLarge, match="field 'a'"):
        parse_multipart(_body([("a", b"x" * 11, None)]), CTYPE, limits)
    with pytest.raises(FormTooLarge, match="file part 'image'"):
        parse_multipart(_body([("image", b"x" * 101, "i.png")]), CTYPE, limits)
    long_header = f"--{BOUNDARY}\r\nX-Long: {'y' * 100}\r\n\r\nv\r\n--{BOUNDARY}--\r\n".encode()
    with pytest.raises(ValueError):
        parse_multipart(long_header, CTYPE, limits)
    many = (
        f"--{BOUNDARY}\r\n"
        + "".join(f"X-{i}: v\r\n" for i in range(5))
        + f'Content-Disposition: form-data; name="a"\r\n\r\nv\r\n--{BOUNDARY}--\r\n'
    ).encode()
    with pytest.raises(ValueError):
        parse_multipart(many, CTYPE, limits)
    with pytest.raises(ValueError, match="closing boundary"):
        parse_multipart(_body([("a", b"v", None)])[:-20], CTYPE, limits)
    fields, files = parse_multipart(_body([("a", b"v", None), ("image", b"\x89PNG", "i.png")]), CTYPE, limits)
    assert fields == {"a": "v"} and files == {"image": b"\x89PNG"}


def test_default_guidance_over_the_limit_refuses_to_build(tmp_path, monkeypatch):
    """A flow-matching export whose own sample_guidance is over max_guidance would skip the bound
    whenever a request names no guidance: the app refuses to build instead."""
    from twinflow.models import ModelConfig, build_generator, save_generator
    from twinflow.serve.app import build_application

    torch.manual_seed(0)
    gen = build_generator(ModelConfig(family="qwen_image", preset="tiny-28g", text_max_length=8))
    save_generator(
        gen,
        tmp_path / "m",
        {"method": "flow_matching", "method_config": {"name": "flow_matching", "sample_guidance": 50.0}},
    )
    monkeypatch.delenv("TWINFLOW_SERVE_TOKEN", raising=False)
    args = {"models": [{"id": "m", "path": str(tmp_path / "m")}], "limits": {"max_guidance": 20.0}}
    with pytest.raises(ValueError, match="default guidance is over limits.max_guidance"):
        build_application(args)


def test_check_limits_bounds_the_default_guidance():
    from twinflow.serve.config import Limits
    from twinflow.serve.schemas import ApiError, GenerateRequest, check_limits

    req = GenerateRequest(prompt="a")
    check_limits(req, "a", Limits(max_guidance=5.0), default_guidance=3.0)
    with pytest.raises(ApiError) as err:
        check_limits(req, "a", Limits(max_guidance=5.0), default_guidance=7.0)
    assert err.value.details[0]["loc"] == ["guidance"]
