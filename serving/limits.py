"""Request limits as small checks that raise the specific :mod:`adapters_store.errors` class.

Body size is enforced twice: from ``Content-Length`` before anything is read, and while streaming (a
chunked body without a length stops being read at the limit), so a large body is never buffered.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from adapters_store.errors import InvalidRequest, PayloadTooLarge, TooManyRequests, ValidationError
from serving.settings import LimitSettings

Receive = Callable[[], Awaitable[dict[str, Any]]]


def check_content_length(headers: dict[bytes, bytes], limit: int) -> None:
    """413 from the declared length alone, before reading a byte."""
    raw = headers.get(b"content-length")
    if raw is None:
        return
    try:
        length = int(raw)
    except ValueError:
        raise InvalidRequest("Content-Length is not a number") from None
    if length > limit:
        raise PayloadTooLarge(f"request body of {length} bytes is over the limit of {limit} bytes")


def limited_receive(receive: Receive, limit: int) -> Receive:
    """Wrap an ASGI ``receive`` so reading past ``limit`` body bytes raises :class:`PayloadTooLarge`."""
    seen = 0

    async def wrapped() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        return message

    return wrapped


async def read_body(receive: Receive, limit: int) -> bytes:
    """Read the whole body through :func:`limited_receive` (so at most ``limit`` bytes are held)."""
    chunks: list[bytes] = []
    guarded = limited_receive(receive, limit)
    while True:
        message = await guarded()
        if message["type"] == "http.disconnect":
            raise InvalidRequest("client disconnected while sending the body")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def check_items(items: Sequence[Any], limits: LimitSettings) -> None:
    """Inputs per request and characters per text (422 each, naming the item)."""
    if not items:
        raise ValidationError("'items' must hold at least one item")
    if len(items) > limits.max_inputs:
        raise ValidationError(f"{len(items)} items in one request; the limit is {limits.max_inputs}")
    for i, item in enumerate(items):
        fanout = getattr(item, "adapters", None)
        if fanout is not None and len(fanout) > limits.max_fanout:
            raise ValidationError(
                f"items[{i}].adapters names {len(fanout)} adapters; the limit is {limits.max_fanout}"
            )
        text = getattr(item, "text", None)
        if text is not None and len(text) > limits.max_chars:
            raise ValidationError(
                f"items[{i}].text has {len(text)} characters; the limit is {limits.max_chars}"
            )
        image = getattr(item, "image_b64", None)
        if image is not None and len(image) * 3 // 4 > limits.max_image_bytes:
            raise PayloadTooLarge(f"items[{i}].image_b64 is over the limit of {limits.max_image_bytes} bytes")
        audio = getattr(item, "audio_b64", None)
        if audio is not None and len(audio) * 3 // 4 > limits.max_audio_bytes:
            raise PayloadTooLarge(f"items[{i}].audio_b64 is over the limit of {limits.max_audio_bytes} bytes")


def _decoded(data_b64: str, what: str, max_bytes: int) -> bytes:
    try:
        raw = base64.b64decode(data_b64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{what}_b64 is not valid base64") from None
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"{what} of {len(raw)} bytes is over the limit of {max_bytes}")
    return raw


def decode_image(data_b64: str, limits: LimitSettings) -> np.ndarray:
    """Base64 PNG/JPEG -> HWC uint8 RGB, checking the pixel count before decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    raw = _decoded(data_b64, "image", limits.max_image_bytes)
    try:
        with Image.open(io.BytesIO(raw)) as img:
            w, h = img.size  # header only: nothing decoded yet
            if w * h > limits.max_image_pixels:
                raise ValidationError(
                    f"image of {w}x{h} pixels is over the limit of {limits.max_image_pixels}"
                )
            if img.format not in ("PNG", "JPEG"):
                raise ValidationError(f"image format {img.format} is not accepted; send PNG or JPEG")
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ValidationError("image_b64 is not a readable PNG or JPEG image") from None


def decode_audio(data_b64: str, limits: LimitSettings, rate: int) -> np.ndarray:
    """Base64 WAV (16-bit PCM, mono, at ``rate`` Hz) -> float32 waveform in [-1, 1]. Nothing is resampled
    or down-mixed: another rate or layout is refused with a message saying what to send."""
    import wave

    raw = _decoded(data_b64, "audio", limits.max_audio_bytes)
    try:
        with wave.open(io.BytesIO(raw)) as w:
            layout = (w.getnchannels(), w.getsampwidth(), w.getframerate())
            frames = w.getnframes()
            if layout != (1, 2, rate):
                raise ValidationError(
                    f"audio is {layout[0]} channel(s), {8 * layout[1]}-bit, {layout[2]} Hz; this base takes "
                    f"mono 16-bit PCM WAV at {rate} Hz"
                )
            if frames > limits.max_audio_seconds * rate:
                raise ValidationError(
                    f"audio of {frames / rate:.1f} s is over the limit of {limits.max_audio_seconds} s"
                )
            pcm = w.readframes(frames)
    except (wave.Error, EOFError):
        raise ValidationError("audio_b64 is not a readable WAV file") from None
    samples = np.frombuffer(pcm, dtype="<i2")
    if samples.size < 400:
        raise ValidationError(
            f"audio of {samples.size} samples is too short; send at least 400 (25 ms at 16 kHz)"
        )
    return (samples.astype(np.float32) / 32768.0).copy()


class TokenCounter:
    """Counts tokens with the base's own tokenizer, for ``token_policy='reject'``."""

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(tokenizer_json)
        # The saved tokenizer may pad to a fixed length or truncate: count the real tokens only.
        self._tok.no_padding()
        self._tok.no_truncation()

    def count(self, text: str) -> int:
        return len(self._tok.encode(text).ids)

    def check(self, text: str, limit: int) -> None:
        n = self.count(text)
        if n > limit:
            raise ValidationError(f"text has {n} tokens; the limit is {limit} (shorten it or split it)")


@dataclass
class InflightLimiter:
    """At most ``capacity`` requests in progress; the next one gets 429 at once instead of queueing."""

    capacity: int
    active: int = 0

    def acquire(self) -> None:
        # Single event loop per worker: no lock needed between the check and the increment.
        if self.active >= self.capacity:
            raise TooManyRequests(
                f"server is at its limit of {self.capacity} requests in progress; retry shortly"
            )
        self.active += 1

    def release(self) -> None:
        self.active = max(0, self.active - 1)
