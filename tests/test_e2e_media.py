"""End to end on a real ``bentoml serve``: an audio base (tiny Wav2Vec2) answers WAV uploads over HTTP."""

from __future__ import annotations

import base64
import io
import wave

import httpx
import numpy as np
import pytest
import torch

from adapters_store import describe_base, open_store
from tests.helpers.bundles import head_bundle_from
from tests.helpers.models import make_tiny_wav2vec2
from tests.service_support import serve_ready, service_env, tenant_auth

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def wav_b64(samples: np.ndarray, rate: int = 16000, channels: int = 1) -> str:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def audio_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e-audio")
    store = open_store(tmp / "store")
    base = store.register_base(describe_base("tiny", make_tiny_wav2vec2(tmp / "w2v")))
    g = torch.Generator().manual_seed(0)
    head = {"out.weight": torch.randn(2, 32, generator=g), "out.bias": torch.zeros(2)}
    store.put(head_bundle_from(base, head, "acme", "tones", ["low", "high"], task="audio-classification"))
    server = serve_ready("serving.service:LoraplexService", service_env(str(tmp / "store"), tmp), tmp)
    yield server
    server.stop()


def test_wav_over_http_is_classified_and_bad_audio_gets_422(audio_server):
    t = np.arange(8000) / 16000
    tone = np.sin(2 * np.pi * 440 * t) * 12000
    with httpx.Client(base_url=audio_server.url, timeout=60) as c:
        ok = c.post(
            "/v1/classify",
            json={"items": [{"adapter": "tones", "audio_b64": wav_b64(tone)}] * 2},
            headers=tenant_auth("acme"),
        )
        assert ok.status_code == 200, ok.text
        assert [r["adapter"] for r in ok.json()] == ["acme/tones", "acme/tones"]
        assert sorted(ok.json()[0]["labels"]) == ["high", "low"] and ok.json()[0] == ok.json()[1]
        for item, status, words in [
            ({"adapter": "tones", "audio_b64": wav_b64(tone, rate=8000)}, 422, "16000 Hz"),
            ({"adapter": "tones", "audio_b64": wav_b64(np.repeat(tone, 2), channels=2)}, 422, "2 channel"),
            ({"adapter": "tones", "audio_b64": "%%%"}, 400, "base64"),
            ({"adapter": "tones", "text": "a text for an audio base"}, 422, "reads audio"),
            ({"adapter": "tones", "text": "x", "audio_b64": wav_b64(tone)}, 422, "exactly one"),
        ]:
            r = c.post("/v1/classify", json={"items": [item]}, headers=tenant_auth("acme"))
            assert r.status_code == status and words in r.json()["message"], (item.keys(), r.text)
        assert c.get("/readyz").status_code == 200
