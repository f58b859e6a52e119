"""The control node: the real-time control loop (control/loop.py) between ROS 2 topics and a policy.

Sensor callbacks validate each message and keep the newest one; the loop runs in its own thread on the
wall clock and publishes one action per tick; the policy runs in the inference worker's thread. A bad
message is logged, counted and dropped; the loop and the node keep running. Services (std_srvs/Trigger):
~/start, ~/stop, ~/estop (latches: no command leaves the node until ~/reset), ~/reset.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy._rclpy_pybind11 import RCLError
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from rclpy.serialization import serialize_message
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from std_srvs.srv import Trigger

from vla_runtime.control.governor import BudgetGovernor
from vla_runtime.control.governor import Profile as GovernorProfile
from vla_runtime.control.inference import ThreadedInferenceWorker
from vla_runtime.control.loop import ControlLoop, LoopMetrics, RuntimeConfig, percentiles_ms
from vla_runtime.control.reuse import NeverReuse
from vla_runtime.control.safety import SafetyConfig
from vla_runtime.ros.common import LATCHED, answer_trigger, as_parameters, speed_up_thread_switching, spin_node
from vla_runtime.ros.messages import (
    ACTION_TYPE_NAMES,
    MessageRejected,
    action_message_class,
    action_to_msg,
    check_stamp,
    image_from_msg,
    state_from_joint_state,
)
from vla_runtime.types import Observation, Policy

MANY_TICKS = sys.maxsize  # the loop runs until stopped


@dataclass
class Sample:
    value: object
    received_s: float  # time.monotonic() when the message arrived


def policy_dims(policy: Policy) -> tuple[int | None, int | None]:
    """(state dim, action dim) when the policy's config says so."""
    config = getattr(policy, "config", None)
    return getattr(config, "state_dim", None), getattr(config, "action_dim", None)


class ControlNode(Node):
    def __init__(self, policy: Policy | None = None, parameter_overrides: dict | None = None,
                 node_name: str = "vla_control"):
        super().__init__(node_name, parameter_overrides=as_parameters(parameter_overrides or {}))
        # State first: destroy_node() may run on a node whose construction failed half-way.
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self.images: dict[str, Sample] = {}
        self.state: Sample | None = None
        self.message_faults: Counter[str] = Counter()
        self.messages_received: Counter[str] = Counter()
        self.commands_published = 0
        self.publish_latency_s: list[float] = []  # image arrival -> first action published from it
        self.run_metrics: list[LoopMetrics] = []  # one per start..stop; the current one last
        self.loop: ControlLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._worker: ThreadedInferenceWorker | None = None
        self._estopped = False
        self._last_chunk_seen = None

        self.bag = None
        p = self._declare_parameters()
        self.params = p
        self.policy = policy if policy is not None else self._build_policy(p)
        if self.policy.privileged:
            raise ValueError(f"Policy '{p['policy']}' reads simulator state; a ROS node has only topics")
        self.ladder = [name.strip() for name in p["accel_ladder"]]
        self.governor = None
        if self.ladder and p["budget_ms"] > 0:
            # No latency priors: every profile "fits" until measured, so the governor starts with the most
            # faithful (the first) and steps down the ladder only while measured p95 exceeds the budget.
            self.governor = BudgetGovernor([GovernorProfile(name, 0.0, -rank) for rank, name in enumerate(self.ladder)],
                                           p["budget_ms"])
        elif self.ladder:
            raise ValueError("accel_ladder needs budget_ms > 0 (the governor picks from the ladder by the budget)")
        self.accel = None
        self.active_profile = ""
        self.set_profile(self.ladder[0] if self.ladder else p["accel"])
        state_dim, action_dim = policy_dims(self.policy)
        self.state_dim = p["state_dim"] or state_dim
        self.action_dim = p["action_dim"] or action_dim or 4
        self.cameras = list(p["camera_names"] or self.policy.camera_names)
        image_topics = list(p["image_topics"] or [f"/camera/{name}/image_raw" for name in self.cameras])
        if len(image_topics) != len(self.cameras):
            raise ValueError(f"image_topics {image_topics} and camera_names {self.cameras} differ in length")
        action_class = action_message_class(p["action_type"])
        self.action_names = list(p["action_names"] or [f"action_{i}" for i in range(self.action_dim)])
        if p["action_type"] == "twist" and self.action_dim > 6:
            raise ValueError(f"action_type=twist carries at most 6 dimensions; the policy outputs {self.action_dim}")
        self.runtime = RuntimeConfig(
            control_hz=p["control_hz"], request_when=p["request_when"], request_threshold=p["request_threshold"],
            execute_horizon=p["execute_horizon"] or getattr(self.policy, "actions_per_chunk", None),
            safety=SafetyConfig(action_low=[-1.0] * self.action_dim, action_high=[1.0] * self.action_dim,
                                stale_observation_s=p["stale_observation_s"],
                                hold_dims=[d for d in p["hold_dims"] if d < self.action_dim]))

        self.instruction = p["instruction"]
        if p["log_bag"]:
            from vla_runtime.data.rosbag import McapBagWriter

            self.bag = McapBagWriter(p["log_bag"])

        for camera, topic in zip(self.cameras, image_topics, strict=True):
            self.create_subscription(Image, topic, lambda msg, c=camera, t=topic: self._on_image(c, t, msg),
                                     qos_profile_sensor_data)
        self.create_subscription(JointState, p["joint_state_topic"], self._on_joint_state, qos_profile_sensor_data)
        self.create_subscription(String, p["instruction_topic"], self._on_instruction, LATCHED)
        self.action_publisher = self.create_publisher(action_class, p["action_topic"], 10)
        self.diagnostics_publisher = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(1.0 / p["diagnostics_hz"], self.publish_diagnostics)
        for name, handler in (("start", self.start), ("stop", self.stop), ("estop", self.estop),
                              ("reset", self.reset)):
            self.create_service(Trigger, f"~/{name}", lambda _req, res, h=handler: answer_trigger(h, res))
        self.get_logger().info(
            f"policy {p['policy']} (accel {self.active_profile}"
            + (f", governor over {self.ladder} at {p['budget_ms']:g} ms" if self.governor else "")
            + f"), {self.runtime.control_hz:g} Hz, cameras "
            f"{dict(zip(self.cameras, image_topics, strict=True))}, actions -> {p['action_topic']} "
            f"({p['action_type']})" + (f", logging to {p['log_bag']}" if self.bag else ""))
        if p["autostart"]:
            self.start()

    def _declare_parameters(self) -> dict:
        defaults = {
            "policy": "ref_dit", "checkpoint": "", "accel": "none", "accel_ladder": [""], "control_hz": 80.0,
            "budget_ms": 0.0,
            "camera_names": [""], "image_topics": [""], "joint_state_topic": "/joint_states", "joint_names": [""],
            "instruction_topic": "/instruction", "instruction": "", "action_topic": "/vla/action",
            "action_type": "joint_trajectory", "action_names": [""], "state_dim": 0, "action_dim": 0,
            "max_message_age_s": 0.5, "stale_observation_s": 0.5, "request_when": "latency",
            "request_threshold": 0, "execute_horizon": 0,
            "hold_dims": [3], "num_threads": 0, "diagnostics_hz": 1.0, "autostart": True, "log_bag": "",
        }
        values = {}
        for name, default in defaults.items():
            value = self.declare_parameter(name, default).value
            # ROS parameters cannot be empty lists without a type; [""] stands for "not set".
            values[name] = [v for v in value if v != ""] if isinstance(value, list) else value
        if values["control_hz"] <= 0:
            raise ValueError(f"control_hz must be positive, got {values['control_hz']}")
        return values

    def _build_policy(self, p: dict) -> Policy:
        from vla_runtime.policies import make_policy

        options = {"checkpoint": p["checkpoint"]} if p["checkpoint"] else {}
        if p["num_threads"]:
            options["num_threads"] = p["num_threads"]
        return make_policy(p["policy"], **options)

    def set_profile(self, spec: str) -> None:
        """Replace the active acceleration profile ("a+b" composes). The governor calls this from the loop
        thread right after a chunk arrived, so no inference is in flight while the model changes."""
        from vla_runtime.accel.profiles import load_profiles
        from vla_runtime.sim.metaworld_suite import MT10, MetaWorldConfig
        from vla_runtime.sim.runner import accelerate

        (profile,) = load_profiles(spec.replace(" ", ""), with_baseline=False)
        if self.accel is not None:
            self.accel.remove()
            self.accel = None
        if profile.methods:
            # Methods that calibrate use the shipped artifact when it exists, else simulator expert frames.
            sim = MetaWorldConfig(cameras=self.policy.camera_names)
            self.accel = accelerate(self.policy, sim, profile, None, list(MT10), 2, self.params["policy"])
        self.active_profile = spec
        if self.loop is not None:
            self.loop.reuse_gate = self._reuse_gate()

    def _reuse_gate(self):
        gate = self.accel.reuse_gate if self.accel is not None and self.accel.reuse_gate else NeverReuse()
        gate.reset()
        return gate

    # ---- incoming messages ----------------------------------------------------------------------
    def _reject(self, topic: str, error: MessageRejected) -> None:
        with self._lock:
            self.message_faults[error.reason] += 1
        self.get_logger().warning(f"dropped message on {topic}: {error}", throttle_duration_sec=1.0)
        self._log_fault(topic, error)

    def _validated(self, topic: str, msgtype: str, msg, what: str, parse):
        """parse(msg) when the message is fresh and well-formed, else None (counted and logged as a fault)."""
        self._log(topic, msgtype, msg)
        try:
            check_stamp(msg.header.stamp, self.get_clock().now().nanoseconds, self.params["max_message_age_s"],
                        f"{what} on {topic}")
            return parse(msg)
        except MessageRejected as error:
            self._reject(topic, error)
            return None

    def _on_image(self, camera: str, topic: str, msg: Image) -> None:
        image = self._validated(topic, "sensor_msgs/msg/Image", msg, "image", image_from_msg)
        if image is not None:
            with self._lock:
                self.images[camera] = Sample(image, time.monotonic())
                self.messages_received["image"] += 1

    def _on_joint_state(self, msg: JointState) -> None:
        state = self._validated(self.params["joint_state_topic"], "sensor_msgs/msg/JointState", msg, "joint state",
                                lambda m: state_from_joint_state(m, self.params["joint_names"], self.state_dim))
        if state is not None:
            with self._lock:
                self.state = Sample(state, time.monotonic())
                self.messages_received["joint_state"] += 1

    def _on_instruction(self, msg: String) -> None:
        self._log(self.params["instruction_topic"], "std_msgs/msg/String", msg)
        with self._lock:
            self.instruction = msg.data

    # ---- the robot, as the control loop sees it -------------------------------------------------
    def has_observation(self) -> bool:
        with self._lock:
            return self.state is not None and all(camera in self.images for camera in self.cameras)

    def observation_age_s(self) -> float:
        with self._lock:
            samples = [self.state, *(self.images.get(camera) for camera in self.cameras)]
        if any(sample is None for sample in samples):
            return float("inf")
        return time.monotonic() - min(sample.received_s for sample in samples)

    def observe(self) -> Observation:
        with self._lock:
            images = {camera: self.images[camera] for camera in self.cameras}
            return Observation(images={camera: sample.value for camera, sample in images.items()},
                               state=self.state.value, instruction=self.instruction,
                               timestamp=max(sample.received_s for sample in images.values()))

    def send(self, command: np.ndarray) -> None:
        with self._send_lock:  # an e-stop waits for a command being published, then no other follows
            if self._estopped:
                return
            msg = action_to_msg(self.params["action_type"], command, self.get_clock().now().to_msg(),
                                self.action_names, 1.0 / self.runtime.control_hz)
            try:
                self.action_publisher.publish(msg)
            except RCLError:
                if self.context.ok():
                    raise
                self.loop.stop()  # a signal shut ROS down mid-tick: nobody left to command
                return
            self.commands_published += 1
        self._log(self.params["action_topic"], ACTION_TYPE_NAMES[self.params["action_type"]], msg)
        chunk = self.loop.last_chunk if self.loop else None
        if chunk is not None and chunk is not self._last_chunk_seen:
            # The first command from a new chunk: the chunk's t0 is its image's arrival time.
            self._last_chunk_seen = chunk
            self.publish_latency_s.append(time.monotonic() - chunk.t0)
            self._log_inference(chunk)

    # ---- lifecycle --------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._loop_thread is not None and self._loop_thread.is_alive()

    def start(self) -> str:
        if self._estopped:
            raise RuntimeError("e-stopped: call ~/reset first")
        if self.running:
            return "already running"
        self._worker = ThreadedInferenceWorker(self.policy)
        self.loop = ControlLoop(self, self._worker, self.runtime, reuse_gate=self._reuse_gate(),
                                governor=self.governor, set_profile=self.set_profile)
        self.run_metrics.append(self.loop.metrics)
        self._loop_thread = threading.Thread(target=self._run_loop, args=(self.loop,), name="control-loop",
                                             daemon=True)
        self._loop_thread.start()
        return "started"

    def _run_loop(self, loop: ControlLoop) -> None:
        while not loop.stop_requested and not self.has_observation():  # nothing to act on before the first frame
            time.sleep(loop.period)
        if not loop.stop_requested:
            loop.run(MANY_TICKS)
        self._flush_log()

    def stop(self) -> str:
        if not self.running:
            return "not running"
        self.loop.stop()
        self._loop_thread.join(timeout=5.0)
        self._worker.close()
        return "stopped"

    def estop(self) -> str:
        with self._send_lock:
            self._estopped = True  # from here on send() publishes nothing, whatever thread ticks
        if self.loop is not None:
            self.loop.estop()
        self.get_logger().error("E-STOP: no command leaves this node until ~/reset")
        self._flush_log()
        return "e-stopped"

    def reset(self) -> str:
        self.stop()
        self.policy.reset()
        self._estopped = False
        self.loop = None
        self._last_chunk_seen = None
        return "reset (call ~/start to run)"

    # ---- diagnostics and logging ------------------------------------------------------------------
    def summary(self) -> dict:
        """Everything the diagnostics report, as a dict (over all runs since launch)."""
        latencies = [s for m in self.run_metrics for s in m.inference_latency_s]
        jitter = [s for m in self.run_metrics for s in m.tick_jitter_s]
        budget_ms = self.params["budget_ms"]
        with self._lock:
            message_faults = dict(self.message_faults)
            received = dict(self.messages_received)
        return {
            "state": "estopped" if self._estopped else "running" if self.running else "idle",
            "policy": self.params["policy"], "profile": self.active_profile,
            "profile_switches": [switch for m in self.run_metrics for switch in m.profile_switches],
            "ticks": sum(m.ticks for m in self.run_metrics),
            "commands_published": self.commands_published,
            "policy_calls": sum(m.policy_calls for m in self.run_metrics),
            "deadline_misses": sum(m.misses for m in self.run_metrics),
            "startup_holds": sum(m.startup_holds for m in self.run_metrics),
            "loop_faults": sum(m.faults for m in self.run_metrics),
            "stale_holds": sum(m.safety_events["stale"] for m in self.run_metrics),
            "message_faults": sum(message_faults.values()), "message_faults_by_reason": message_faults,
            "messages_received": received,
            "latency_ms": percentiles_ms(latencies),
            "image_to_action_ms": percentiles_ms(self.publish_latency_s),
            "tick_jitter_ms": percentiles_ms(jitter),
            "over_budget_calls": sum(1 for s in latencies if budget_ms > 0 and 1000 * s > budget_ms),
        }

    def publish_diagnostics(self) -> None:
        summary = self.summary()
        level = {"estopped": DiagnosticStatus.ERROR, "running": DiagnosticStatus.OK}.get(summary["state"],
                                                                                        DiagnosticStatus.WARN)
        if summary["state"] == "running" and (summary["message_faults"] or summary["loop_faults"]):
            level = DiagnosticStatus.WARN
        array = self._status_array(f"vla_runtime: {self.get_name()}", level, summary["state"], summary)
        self.diagnostics_publisher.publish(array)
        self._log("/diagnostics", "diagnostic_msgs/msg/DiagnosticArray", array)

    def _log(self, topic: str, msgtype: str, msg) -> None:
        if self.bag is not None:
            self.bag.write(topic, msgtype, serialize_message(msg), self.get_clock().now().nanoseconds)

    def _status_array(self, name: str, level: int, message: str, values: dict) -> DiagnosticArray:
        """One DiagnosticStatus, stamped now; dict and list values as json, the rest as text."""
        status = DiagnosticStatus(level=level, name=name, message=message, hardware_id=self.params["policy"],
                                  values=[KeyValue(key=k, value=json.dumps(v) if isinstance(v, dict | list) else str(v))
                                          for k, v in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        return array

    def _log_fault(self, topic: str, error: MessageRejected) -> None:
        if self.bag is not None:
            array = self._status_array("fault", DiagnosticStatus.WARN, str(error), {"topic": topic,
                                                                                  "reason": error.reason})
            self._log("/vla_runtime/faults", "diagnostic_msgs/msg/DiagnosticArray", array)

    def _log_inference(self, chunk) -> None:
        """One record per chunk (its latency and actions), then a flush: a crash loses at most one chunk."""
        if self.bag is None:
            return
        values = {"inference_latency_ms": 1000 * self.loop.metrics.inference_latency_s[-1],
                  "image_to_action_ms": 1000 * self.publish_latency_s[-1],
                  "actions": np.round(chunk.actions, 5).tolist()}
        self._log("/vla_runtime/inference", "diagnostic_msgs/msg/DiagnosticArray",
                  self._status_array("inference", DiagnosticStatus.OK, "chunk", values))
        self.bag.flush()

    def _flush_log(self) -> None:
        if self.bag is not None:
            self.bag.flush()

    def destroy_node(self) -> None:
        self.stop()
        if self.bag is not None:
            self.bag.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    """`ros2 run vla_runtime control_node --ros-args -p policy:=ref_dit ...`"""
    speed_up_thread_switching()
    spin_node(ControlNode, args)


if __name__ == "__main__":
    main()
