"""Samples for body-inspection tests: one fake key per family, and a corpus of clean payloads.

Keys are generated at test time from a seeded RNG, so the source holds no key-shaped literal for a
secret scanner to trip over and every run uses the same values. The clean corpus is what agents
really send (GitHub and OpenAI payloads, a PNG, UUIDs, commit SHAs, prose, minified JS, near
misses such as "sk-learn" or a Stripe test key) and must pass inspection without a finding.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import string
import struct
import uuid
import zlib

ALNUM = string.ascii_letters + string.digits
UPPER_ALNUM = string.ascii_uppercase + string.digits
URLSAFE = ALNUM + "-_"


def _rand(rng: random.Random, alphabet: str, size: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(size))


def fake_keys(seed: int = 7) -> dict[str, list[str]]:
    """Realistically shaped (but fake) keys, several per family."""
    r = random.Random(seed)
    pem_body = base64.b64encode(r.randbytes(600)).decode()
    lines = "\n".join(pem_body[i:i + 64] for i in range(0, len(pem_body), 64))
    return {
        "openai_key": ["sk-" + _rand(r, ALNUM, 20) + "T3BlbkFJ" + _rand(r, ALNUM, 20),
                       "sk-proj-" + _rand(r, URLSAFE, 156), "sk-svcacct-" + _rand(r, URLSAFE, 80)],
        "anthropic_key": ["sk-ant-api03-" + _rand(r, URLSAFE, 93) + "AA", "sk-ant-admin01-" + _rand(r, URLSAFE, 90)],
        "github_token": [p + _rand(r, ALNUM, 36) for p in ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")]
        + ["github_pat_" + _rand(r, ALNUM, 22) + "_" + _rand(r, ALNUM, 59)],
        "slack_token": [f"xox{c}-{r.randrange(10**11, 10**12)}-{r.randrange(10**12, 10**13)}-{_rand(r, ALNUM, 24)}"
                        for c in "abprs"],
        "aws_access_key": ["AKIA" + _rand(r, UPPER_ALNUM, 16), "ASIA" + _rand(r, UPPER_ALNUM, 16)],
        "google_api_key": ["AIza" + _rand(r, URLSAFE, 35)],
        "stripe_key": ["sk_live_" + _rand(r, ALNUM, 24), "rk_live_" + _rand(r, ALNUM, 99)],
        "private_key": [f"-----BEGIN {kind}PRIVATE KEY-----\n{lines}\n-----END {kind}PRIVATE KEY-----\n"
                        for kind in ("", "RSA ", "EC ", "OPENSSH ", "ENCRYPTED ")]
        + ["-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,"
           + _rand(r, "0123456789ABCDEF", 32) + "\n\n" + lines + "\n-----END RSA PRIVATE KEY-----\n"],
        "connection_url": ["postgres://app:" + _rand(r, ALNUM, 16) + "@db.internal:5432/prod",
                           "mongodb+srv://admin:" + _rand(r, ALNUM, 12) + "@cluster0.example.net/?retryWrites=true",
                           "redis://:" + _rand(r, ALNUM, 20) + "@cache.example.com:6379/0",
                           "https://deploy:" + _rand(r, ALNUM, 10) + "@git.example.com/acme/app.git"],
        "aegis_agent_token": ["aegis_" + _rand(r, URLSAFE, 43)],
    }


def _png(rng: random.Random, width: int = 96, height: int = 64) -> bytes:
    """A real (noisy) RGB PNG, so its base64 looks like an uploaded image."""
    raw = b"".join(b"\x00" + rng.randbytes(width * 3) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


LOREM = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
         "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip "
         "ex ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore. ")

MINIFIED_JS = (
    '!function(e,t){"object"==typeof exports&&"undefined"!=typeof module?module.exports=t():"function"==typeof '
    'define&&define.amd?define(t):(e=e||self).lib=t()}(this,function(){"use strict";var e="https://",t=function'
    '(n,r,o){return e+n+":"+r+"@"+o},n=/^(?:[a-z+]+:)?\\/\\//i,r={task:"task-runner-configuration-settings",'
    'disk:"disk-usage-monitor",sk:"sk-learn",key:"api_key"};function o(e){for(var t=0,n=e.length;t<n;t++)'
    'if(e.charCodeAt(t)>127)return!1;return!0}return{url:t,isAbs:function(e){return n.test(e)},ascii:o,cfg:r,'
    'v:"3.7.1",h:"' + hashlib.sha256(b"bundle").hexdigest() + '"}});'
)


def clean_corpus(seed: int = 11) -> dict[str, bytes]:
    """Named payloads that must never trigger inspection."""
    rng = random.Random(seed)
    shas = [hashlib.sha1(rng.randbytes(16), usedforsecurity=False).hexdigest() for _ in range(200)]
    uuids = [str(uuid.UUID(bytes=rng.randbytes(16), version=4)) for _ in range(300)]
    png = _png(rng)
    issue = {
        "url": "https://api.github.com/repos/acme/app/issues/1347", "id": 1_801_234_567,
        "node_id": "I_kwDOABCD1c5rT9Qx", "number": 1347, "title": "Crash when the task-runner config is empty",
        "user": {"login": "octocat", "id": 583231, "avatar_url": "https://avatars.githubusercontent.com/u/583231?v=4",
                 "html_url": "https://github.com/octocat", "type": "User", "site_admin": False},
        "labels": [{"id": 208045946, "name": "bug", "color": "d73a4a", "default": True}],
        "state": "open", "locked": False, "comments": 4, "created_at": "2024-05-01T09:12:44Z",
        "body": "Steps:\n1. `pip install scikit-learn` (sk-learn)\n2. run `task-runner --disk-usage`\n"
                f"Fails at commit {shas[0]} (see {shas[1][:7]}).\nTrace id {uuids[0]}.",
        "reactions": {"+1": 3, "-1": 0, "laugh": 0}, "pull_request": None,
        "commits": [{"sha": s, "message": f"Fix {u}"} for s, u in zip(shas[2:40], uuids[1:], strict=False)],
    }
    chat = {
        "model": "gpt-4o-mini", "temperature": 0.2, "stream": True,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Never reveal API keys or passwords."},
            {"role": "user", "content": "How do I rotate an API key safely? Our docs mention sk-learn, the "
             "sk_test_ prefix of Stripe test keys, AKIA-style key ids and the phrase -----BEGIN PRIVATE KEY----- "
             "but contain no real keys. Connection strings look like postgres://user:${DB_PASSWORD}@db:5432/app "
             "or https://user@example.com/path and mysql://root:<password>@localhost/db. " + LOREM},
            {"role": "assistant", "content": LOREM * 3},
        ],
    }
    vision = {"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}]}]}
    stripe_test = "sk_test_" + _rand(rng, ALNUM, 24)
    return {
        "github_issue": json.dumps(issue, indent=2).encode(),
        "openai_chat": json.dumps(chat).encode(),
        "openai_vision_png": json.dumps(vision).encode(),
        "png_base64_urlsafe": base64.urlsafe_b64encode(png),
        "png_base64_mime": base64.encodebytes(png),
        "uuid_list": json.dumps({"ids": uuids}).encode(),
        "commit_shas": "\n".join(f"{s} {s[:7]} refs/heads/feature-{i}" for i, s in enumerate(shas)).encode(),
        "lorem_ipsum": (LOREM * 40).encode(),
        "minified_js": MINIFIED_JS.encode() * 3,
        "form_urlencoded": (f"q=sk-learn+tutorial&token_type=bearer&redirect=https%3A%2F%2Fexample.com%2Fcb"
                            f"&state={uuids[5]}&stripe={stripe_test}").encode(),
        "pem_public_key": ("-----BEGIN PUBLIC KEY-----\n" + base64.encodebytes(rng.randbytes(294)).decode()
                           + "-----END PUBLIC KEY-----\n").encode(),
        "json_unicode_escapes": json.dumps({"text": "Grüße aus Köln — naïve café ☕ " * 20, "emoji": "😀🚀"}).encode(),
        "short_prefixes": b"ghp_short gho_ AKIA1234 AIza_too_short xoxb- sk-abc rk_live_x github_pat_x",
    }
