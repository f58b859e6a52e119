"""The wire format of `vla-serve`: openpi's websocket protocol, so `openpi-client` speaks to it unchanged.

On connect the server sends its metadata; then each binary message is an observation dict and each answer
`{"actions": [H, A], "server_timing": {...}}`, msgpack-encoded with numpy arrays as openpi's `msgpack_numpy`
writes them ({"__ndarray__": True, "data", "dtype", "shape"}). An error is answered with a text message
(openpi's client raises it). Only plain numeric arrays are decoded: nothing is ever unpickled, and an object
array is refused rather than built.

`ObservationKeys` maps a request's keys to the policy's cameras, state and instruction (openpi's example keys
by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from vla_runtime.types import ChunkPrefix, Observation, PolicySpec

NUMERIC_KINDS = "biuf"  # bool, signed / unsigned integers, floats


class ProtocolError(ValueError):
    """A request the server answers with an error (and stays up)."""


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray | np.generic) and obj.dtype.kind not in NUMERIC_KINDS:
        raise ProtocolError(f"cannot send an array of dtype {obj.dtype}: numeric arrays only")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _decode(obj: dict) -> Any:
    if b"__ndarray__" not in obj and b"__npgeneric__" not in obj:
        return obj
    try:
        dtype = np.dtype(obj[b"dtype"])
        if dtype.kind not in NUMERIC_KINDS:
            raise ProtocolError(f"refused an array of dtype {dtype}: numeric arrays only")
        if b"__npgeneric__" in obj:
            return dtype.type(obj[b"data"])
        # A copy: a view would keep the whole message alive, and be read-only.
        return np.frombuffer(obj[b"data"], dtype=dtype).reshape(obj[b"shape"]).copy()
    except ProtocolError:
        raise
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: -1 as uint8, 2**64 as int64
        raise ProtocolError(f"malformed array in the message: {type(exc).__name__}: {str(exc)[:120]}") from exc


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_encode)


def unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, object_hook=_decode, strict_map_key=False)
    except ProtocolError:
        raise
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise ProtocolError(f"not a msgpack message ({type(exc).__name__}{': ' + str(exc) if str(exc) else ''})") \
            from exc


def describe(value: Any) -> str:
    """What a value is, in a few words (type and shape, never its content): for error messages, which a client
    could otherwise make as large as its request."""
    if isinstance(value, np.ndarray | np.generic):
        return f"a {value.dtype} array of shape {tuple(value.shape)}"
    if isinstance(value, list | tuple | dict):
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, str | bytes):
        return f"{type(value).__name__} of length {len(value)}"
    return "nothing" if value is None else type(value).__name__


def numbers(value: Any, key: str, count: int) -> np.ndarray:
    """`count` finite numbers as float32, from a numeric array or a flat list of numbers; anything else is a
    ProtocolError describing what came (sizes are checked before anything is converted)."""
    problem = ProtocolError(f"'{key}' must be {count} finite numbers, got {describe(value)}")
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in NUMERIC_KINDS or value.size != count:
            raise problem
    elif isinstance(value, list | tuple):
        if len(value) != count or not all(isinstance(item, int | float | np.number | np.bool_) for item in value):
            raise problem
    else:
        raise problem
    try:
        vector = np.asarray(value, dtype=np.float32).reshape(-1)
    except (ValueError, TypeError, OverflowError) as exc:
        raise problem from exc
    if not np.all(np.isfinite(vector)):
        raise problem
    return vector


@dataclass(frozen=True)
class ObservationKeys:
    """Which request key is what. `images`: camera -> key; empty: the policy's cameras in order take
    `observation/image`, `observation/wrist_image`, ... (openpi's examples)."""

    images: dict[str, str] = field(default_factory=dict)
    state: str = "observation/state"
    prompt: str = "prompt"
    # Real-time chunking (optional): the actions still queued from the request's tick on, [L, A], and the delay in
    # control ticks before the new chunk can arrive (`ChunkPrefix`; a policy trained for it continues them).
    prefix_actions: str = "rtc/prefix_actions"
    prefix_delay: str = "rtc/prefix_delay"

    def image_keys(self, cameras: tuple[str, ...]) -> dict[str, str]:
        if self.images:
            return dict(self.images)
        defaults = ["observation/image", "observation/wrist_image"]
        return {camera: defaults[i] if i < len(defaults) else f"observation/image_{i}"
                for i, camera in enumerate(cameras)}

    def to_observation(self, message: Any, spec: PolicySpec, timestamp: float,
                       max_prompt_chars: int | None = None) -> Observation:
        """The request as the policy's `Observation`; a ProtocolError naming what is missing or mis-shaped."""
        if not isinstance(message, dict):
            raise ProtocolError(f"expected an observation dict, got {describe(message)}")
        prompt = message.get(self.prompt, "")
        if not isinstance(prompt, str):
            raise ProtocolError(f"'{self.prompt}' must be a string, got {describe(prompt)}")
        if max_prompt_chars is not None and len(prompt) > max_prompt_chars:
            raise ProtocolError(f"'{self.prompt}' is {len(prompt)} characters; this server takes at most "
                                f"{max_prompt_chars} (max_prompt_chars)")
        height, width = spec.image_size
        images = {}
        for camera, key in self.image_keys(spec.cameras).items():
            image = message.get(key)
            if not isinstance(image, np.ndarray) or image.shape != (height, width, 3) or image.dtype != np.uint8:
                raise ProtocolError(f"'{key}' (camera {camera}) must be a uint8 {height}x{width}x3 image, "
                                    f"got {describe(image)}")
            images[camera] = image
        state = numbers(message.get(self.state), self.state, spec.state_dim) if spec.state_dim else \
            np.zeros(0, np.float32)
        return Observation(images, state, prompt, timestamp, prefix=self._prefix(message, spec))

    def _prefix(self, message: dict, spec: PolicySpec) -> ChunkPrefix | None:
        actions, delay = message.get(self.prefix_actions), message.get(self.prefix_delay)
        if actions is None and delay is None:
            return None
        if not isinstance(delay, int) or isinstance(delay, bool) or delay < 0:
            raise ProtocolError(f"'{self.prefix_delay}' must be an integer >= 0 (control ticks), got {describe(delay)}")
        problem = ProtocolError(f"'{self.prefix_actions}' must be 1 to {spec.chunk_size} rows of {spec.action_dim} "
                                f"finite numbers, got {describe(actions)}")
        if isinstance(actions, np.ndarray) and actions.dtype.kind not in NUMERIC_KINDS:
            raise problem
        try:
            array = np.asarray(actions, dtype=np.float32)
        except (ValueError, TypeError, OverflowError) as exc:
            raise problem from exc
        if array.ndim != 2 or not 1 <= len(array) <= spec.chunk_size or array.shape[1] != spec.action_dim \
                or not np.all(np.isfinite(array)):
            raise problem
        return ChunkPrefix(array, delay)

    def to_message(self, obs: Observation, cameras: tuple[str, ...]) -> dict:
        """An `Observation` as a request (the remote policy's side)."""
        message = {key: obs.images[camera] for camera, key in self.image_keys(cameras).items()}
        if obs.prefix is not None:
            message[self.prefix_actions] = np.asarray(obs.prefix.actions, np.float32)
            message[self.prefix_delay] = int(obs.prefix.delay)
        return {**message, self.state: np.asarray(obs.state, np.float32), self.prompt: obs.instruction}
