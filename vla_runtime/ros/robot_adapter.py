"""The robot as the control loop sees it (`control.loop.Robot`), fed by ROS sensor topics.

Each callback validates its message (encoding, size, resolution, NaN, joint names, stamp age) and keeps
the newest good one; a bad one is counted under its reason, reported to `on_fault` and dropped, and the
loop keeps running on what it had. Commands leave through `publish`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vla_runtime.data.messages import MessageRejected, check_stamp, fit_image, image_from_msg, state_from_joint_state
from vla_runtime.types import ImageCrop, Observation


@dataclass
class Sample:
    value: object
    received_s: float  # time.monotonic() when the message arrived


@dataclass(frozen=True)
class SensorSettings:
    cameras: tuple[str, ...]
    image_size: tuple[int, int] | None  # what the policy reads; None: any
    resize_images: bool  # a full camera frame is cut to image_crop and resized to image_size
    image_crop: ImageCrop | None
    state_dim: int
    joint_names: tuple[str, ...]
    max_message_age_s: float


class FaultLog:
    """Logs dropped messages, throttled per (topic, reason): the first of a kind at once, then at most one line
    per `interval_s` of that kind saying how many were not logged. A camera flooding the log with frames at the
    wrong resolution cannot hide NaN joint states; the diagnostics count every fault either way."""

    def __init__(self, log: Callable[[str], None], interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self._log = log
        self._clock = clock
        self._last_s: dict[tuple[str, str], float] = {}
        self._suppressed: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def __call__(self, topic: str, error: MessageRejected) -> None:
        kind = (topic, error.reason)
        with self._lock:
            now = self._clock()
            if now - self._last_s.get(kind, -float("inf")) < self.interval_s:
                self._suppressed[kind] += 1
                return
            self._last_s[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
        more = f" ({suppressed} more '{error.reason}' not logged since the last)" if suppressed else ""
        self._log(f"dropped message on {topic}: {error}{more}")


class TopicRobot:
    def __init__(self, settings: SensorSettings, instruction: str, now_ns: Callable[[], int],
                 publish: Callable[[np.ndarray], None], on_fault: Callable[[str, MessageRejected], None]):
        self.settings = settings
        self.instruction = instruction
        self._now_ns = now_ns
        self._publish = publish
        self._on_fault = on_fault
        self._lock = threading.Lock()
        self.images: dict[str, Sample] = {}
        self.state: Sample | None = None
        self.message_faults: Counter[str] = Counter()
        self.messages_received: Counter[str] = Counter()

    # ---- incoming messages ----------------------------------------------------------------------
    def _validated(self, topic: str, msg, what: str, parse):
        """parse(msg) when the message is fresh and well-formed, else None (counted and reported as a fault)."""
        try:
            check_stamp(msg.header.stamp, self._now_ns(), self.settings.max_message_age_s, f"{what} on {topic}")
            return parse(msg)
        except MessageRejected as error:
            with self._lock:
                self.message_faults[error.reason] += 1
            self._on_fault(topic, error)
            return None

    def on_image(self, camera: str, topic: str, msg) -> None:
        size, resize = self.settings.image_size, self.settings.resize_images
        image = self._validated(topic, msg, "image",
                                lambda m: fit_image(image_from_msg(m), size, resize, self.settings.image_crop)
                                if size else image_from_msg(m))
        if image is not None:
            with self._lock:
                self.images[camera] = Sample(image, time.monotonic())
                self.messages_received["image"] += 1

    def on_joint_state(self, topic: str, msg) -> None:
        state = self._validated(topic, msg, "joint state", lambda m: state_from_joint_state(
            m, list(self.settings.joint_names), self.settings.state_dim))
        if state is not None:
            with self._lock:
                self.state = Sample(state, time.monotonic())
                self.messages_received["joint_state"] += 1

    def on_instruction(self, text: str) -> None:
        with self._lock:
            self.instruction = text

    def faults(self) -> tuple[dict, dict]:
        """(message faults by reason, messages received by kind)."""
        with self._lock:
            return dict(self.message_faults), dict(self.messages_received)

    # ---- control.loop.Robot ---------------------------------------------------------------------
    def has_observation(self) -> bool:
        with self._lock:
            return self.state is not None and all(camera in self.images for camera in self.settings.cameras)

    def observation_age_s(self) -> float:
        with self._lock:
            samples = [self.state, *(self.images.get(camera) for camera in self.settings.cameras)]
        if any(sample is None for sample in samples):
            return float("inf")
        return time.monotonic() - min(sample.received_s for sample in samples)

    def observe(self) -> Observation:
        with self._lock:
            images = {camera: self.images[camera] for camera in self.settings.cameras}
            stamps = [sample.received_s for sample in images.values()] or [self.state.received_s]
            return Observation(images={camera: sample.value for camera, sample in images.items()},
                               state=self.state.value, instruction=self.instruction, timestamp=max(stamps))

    def send(self, command: np.ndarray) -> None:
        self._publish(command)
