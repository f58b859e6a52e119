"""The control node's episode log: every message in and out, faults, and one record per chunk, in an MCAP
file flushed after every chunk (a crash loses at most one chunk)."""

from __future__ import annotations

import json

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.serialization import serialize_message

from vla_runtime.data.messages import MessageRejected
from vla_runtime.data.rosbag import McapBagWriter
from vla_runtime.types import ActionChunk

STATUS_TYPE = "diagnostic_msgs/msg/DiagnosticArray"


def status_array(name: str, level: int, message: str, values: dict, hardware_id: str, stamp) -> DiagnosticArray:
    """One DiagnosticStatus; dict and list values as json, the rest as text."""
    status = DiagnosticStatus(level=level, name=name, message=message, hardware_id=hardware_id,
                              values=[KeyValue(key=k, value=json.dumps(v) if isinstance(v, dict | list) else str(v))
                                      for k, v in values.items()])
    array = DiagnosticArray(status=[status])
    array.header.stamp = stamp
    return array


class BagLogger:
    def __init__(self, path: str, clock, hardware_id: str):
        self.writer = McapBagWriter(path)
        self.clock = clock  # the node's clock: log times and stamps
        self.hardware_id = hardware_id

    def log(self, topic: str, msgtype: str, msg) -> None:
        self.writer.write(topic, msgtype, serialize_message(msg), self.clock.now().nanoseconds)

    def _status(self, topic: str, name: str, level: int, message: str, values: dict) -> None:
        self.log(topic, STATUS_TYPE, status_array(name, level, message, values, self.hardware_id,
                                                  self.clock.now().to_msg()))

    def fault(self, topic: str, error: MessageRejected) -> None:
        self._status("/vla_runtime/faults", "fault", DiagnosticStatus.WARN, str(error),
                     {"topic": topic, "reason": error.reason})

    def inference(self, chunk: ActionChunk, latency_s: float, image_to_action_s: float) -> None:
        """One record per chunk (its latency and actions), then a flush."""
        self._status("/vla_runtime/inference", "inference", DiagnosticStatus.OK, "chunk",
                     {"inference_latency_ms": 1000 * latency_s, "image_to_action_ms": 1000 * image_to_action_s,
                      "actions": np.round(chunk.actions, 5).tolist()})
        self.writer.flush()

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
