"""The control node: the real-time control loop (control/loop.py) between ROS 2 topics and a policy.

It wires five parts: the parameters (`parameters.py`), the robot contract the policy must fit
(`robot_contract.py`: the parameters', a robot file's, or a suite's when the node is given one), the robot
adapter that validates sensor messages and publishes commands (`robot_adapter.py`), the acceleration profile
and governor (`profile_manager.py`) and the episode log (`bag_logger.py`). The loop runs in its own thread
on the wall clock and publishes one action per tick; the policy runs in the inference worker's thread. A bad
message is logged (throttled per topic and reason), counted and dropped; the loop and the node keep running.
Services (std_srvs/Trigger): ~/start, ~/stop, ~/estop (latches: no command leaves the node until ~/reset),
~/reset.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy._rclpy_pybind11 import RCLError
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from std_srvs.srv import Trigger

from vla_runtime.control.inference import ThreadedInferenceWorker
from vla_runtime.control.loop import ControlLoop, RuntimeConfig
from vla_runtime.control.metrics import LoopMetrics, percentiles_ms, smoothness
from vla_runtime.control.rtc import DelayEstimator, RTCConfig, chunked
from vla_runtime.control.safety import SafetyConfig
from vla_runtime.data.messages import ACTION_TYPE_NAMES, MessageRejected
from vla_runtime.evaluation.observations import calibration_source
from vla_runtime.execution import exec_config
from vla_runtime.ros.bag_logger import STATUS_TYPE, BagLogger, status_array
from vla_runtime.ros.common import (
    LATCHED,
    answer_trigger,
    camera_topic,
    json_object,
    speed_up_thread_switching,
    spin_node,
    suite_options,
)
from vla_runtime.ros.messages import action_message_class, action_to_msg
from vla_runtime.ros.parameters import ControlParams, as_parameters, declare
from vla_runtime.ros.profile_manager import ProfileManager
from vla_runtime.ros.robot_adapter import FaultLog, SensorSettings, TopicRobot
from vla_runtime.ros.robot_contract import FIELDS as CONTRACT_FIELDS
from vla_runtime.ros.robot_contract import RobotContract, read_robot_file, robot_contract, suite_fields
from vla_runtime.sim.suite import Suite, configured_suite, suite_names
from vla_runtime.types import Policy

MANY_TICKS = sys.maxsize  # the loop runs until stopped


class ControlNode(Node):
    def __init__(self, policy: Policy | None = None, parameter_overrides: dict | None = None,
                 node_name: str = "vla_control"):
        super().__init__(node_name, parameter_overrides=as_parameters(parameter_overrides or {}, ControlParams))
        # State first: destroy_node() may run on a node whose construction failed half-way.
        self._send_lock = threading.Lock()
        self.commands_published = 0
        self.publish_latency_s: list[float] = []  # image arrival -> first action published from it
        self.run_metrics: list[LoopMetrics] = []  # one per start..stop; the current one last
        self.loop: ControlLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._worker: ThreadedInferenceWorker | None = None
        self._estopped = False
        self._last_chunk_seen = None
        self.bag: BagLogger | None = None
        self._fault_log = FaultLog(self.get_logger().warning)

        self.params = p = declare(self, ControlParams)
        robot_file = read_robot_file(p.robot_file) if p.robot_file else {}
        suite, calibration_tasks = configured_suite(p.suite, **suite_options(p.suite_options)) if p.suite \
            else (None, [])
        self.policy = policy if policy is not None else self._build_policy(p, suite)
        spec = self.policy.spec
        if spec.privileged:
            raise ValueError(f"Policy '{p.policy}' reads simulator state; a ROS node has only topics")
        self.contract = self._contract(p, robot_file, suite)
        self.profiles = ProfileManager(self.policy, p.policy, p.accel, [n.strip() for n in p.accel_ladder],
                                       p.budget_ms, calibration_source(suite, calibration_tasks, 2) if suite else None,
                                       exec_config(p.exec), p.calibration_dir)
        self.action_dim = spec.action_dim
        if p.action_type == "twist" and self.action_dim > 6:
            raise ValueError(f"action_type=twist carries at most 6 dimensions; the policy outputs {self.action_dim}")
        self.action_names = list(p.action_names or [f"action_{i}" for i in range(self.action_dim)])
        self.robot = self._robot(p)
        self.runtime = self._runtime(p, self.contract)
        # rtc: outermost on the head's step, so every profile runs inside the guidance
        self.policy = chunked(self.policy, self.runtime.chunking, self.runtime.rtc)
        # One estimate for the node's life: the warm-up calls it leaves out are the process's first.
        self.delays = DelayEstimator(1.0 / self.runtime.control_hz, self.runtime.warmup_calls)
        if p.log_bag:
            self.bag = BagLogger(p.log_bag, self.get_clock(), p.policy)
        self._connect(p)
        governor = f", governor over {list(p.accel_ladder)} at {p.budget_ms:g} ms" if self.profiles.governor else ""
        cameras = dict(zip(self.robot.settings.cameras, self.image_topics, strict=True))
        self.get_logger().info(
            f"policy {p.policy} ({spec.describe()}; accel {self.profiles.active}{governor}), robot "
            f"{self.contract.describe()}, cameras {cameras}, actions -> {p.action_topic} "
            f"({p.action_type})" + (f", logging to {p.log_bag}" if self.bag else ""))
        if p.autostart:
            self.start()

    def _build_policy(self, p: ControlParams, suite: Suite | None) -> Policy:
        from vla_runtime.policies import make_policy
        from vla_runtime.policies.registry import POLICIES

        if suite is None and POLICIES.get(p.policy).needs_suite:
            raise ValueError(f"policy {p.policy} is built for a simulator suite's robot: set suite:=<one of "
                             f"{', '.join(suite_names())}>")
        options = json_object(p.policy_options, "policy_options", "policy settings")
        if p.checkpoint:
            options["checkpoint"] = p.checkpoint
        if p.num_threads:  # this process's torch threads, whichever policy (a remote one computes elsewhere)
            import torch

            torch.set_num_threads(p.num_threads)
        return make_policy(p.policy, suite=suite, **options)

    def _contract(self, p: ControlParams, robot_file: dict, suite: Suite | None) -> RobotContract:
        """The robot contract: the parameters, else the robot file, else the suite (when given one)."""
        layers = [("parameter", {name: getattr(p, name) for name in CONTRACT_FIELDS if getattr(p, name) is not None})]
        if robot_file:
            layers.append((f"robot_file {p.robot_file}", robot_file))
        if suite is not None:
            layers.append((f"suite {p.suite}", suite_fields(suite.spec)))
        return robot_contract(layers, self.policy.spec, p.policy)

    def _robot(self, p: ControlParams) -> TopicRobot:
        spec = self.policy.spec
        cameras = tuple(p.camera_names or spec.cameras)
        self.image_topics = list(p.image_topics or [camera_topic(name) for name in cameras])
        if len(self.image_topics) != len(cameras):
            raise ValueError(f"image_topics {self.image_topics} and camera_names {list(cameras)} differ in length")
        settings = SensorSettings(cameras=cameras, image_size=spec.image_size, resize_images=p.resize_images,
                                  image_crop=spec.image_crop, state_dim=spec.state_dim, joint_names=p.joint_names,
                                  max_message_age_s=p.max_message_age_s)
        return TopicRobot(settings, p.instruction, lambda: self.get_clock().now().nanoseconds, self._publish,
                          self._on_fault)

    def _runtime(self, p: ControlParams, contract: RobotContract) -> RuntimeConfig:
        return RuntimeConfig(
            control_hz=contract.control_hz, request_when=p.request_when,
            request_threshold=None if p.request_threshold < 0 else p.request_threshold,
            execute_horizon=p.execute_horizon or None,
            chunking=p.chunking, rtc=RTCConfig(max_guidance=p.rtc_max_guidance), max_in_flight=p.max_in_flight or None,
            safety=SafetyConfig(action_low=list(contract.action_low), action_high=list(contract.action_high),
                                stale_observation_s=p.stale_observation_s,
                                hold_dims=list(contract.hold_dims))).for_policy(self.policy.spec)

    def _connect(self, p: ControlParams) -> None:
        """Subscriptions, publishers, timers and services."""
        for camera, topic in zip(self.robot.settings.cameras, self.image_topics, strict=True):
            self.create_subscription(Image, topic, lambda msg, c=camera, t=topic: self._on_message(
                t, "sensor_msgs/msg/Image", msg, lambda: self.robot.on_image(c, t, msg)), qos_profile_sensor_data)
        topic = p.joint_state_topic
        self.create_subscription(JointState, topic, lambda msg: self._on_message(
            topic, "sensor_msgs/msg/JointState", msg, lambda: self.robot.on_joint_state(topic, msg)),
            qos_profile_sensor_data)
        self.create_subscription(String, p.instruction_topic, lambda msg: self._on_message(
            p.instruction_topic, "std_msgs/msg/String", msg, lambda: self.robot.on_instruction(msg.data)), LATCHED)
        self.action_publisher = self.create_publisher(action_message_class(p.action_type), p.action_topic, 10)
        self.diagnostics_publisher = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(1.0 / p.diagnostics_hz, self.publish_diagnostics)
        for name, handler in (("start", self.start), ("stop", self.stop), ("estop", self.estop),
                              ("reset", self.reset)):
            self.create_service(Trigger, f"~/{name}", lambda _req, res, h=handler: answer_trigger(h, res))

    # ---- messages in and out ----------------------------------------------------------------------
    def _on_message(self, topic: str, msgtype: str, msg, handle) -> None:
        if self.bag is not None:
            self.bag.log(topic, msgtype, msg)
        handle()

    def _on_fault(self, topic: str, error: MessageRejected) -> None:
        self._fault_log(topic, error)
        if self.bag is not None:
            self.bag.fault(topic, error)

    def _publish(self, command: np.ndarray) -> None:
        with self._send_lock:  # an e-stop waits for a command being published, then no other follows
            if self._estopped:
                return
            msg = action_to_msg(self.params.action_type, command, self.get_clock().now().to_msg(),
                                self.action_names, 1.0 / self.runtime.control_hz)
            try:
                self.action_publisher.publish(msg)
            except RCLError:
                if self.context.ok():
                    raise
                self.loop.stop()  # a signal shut ROS down mid-tick: nobody left to command
                return
            self.commands_published += 1
        if self.bag is not None:
            self.bag.log(self.params.action_topic, ACTION_TYPE_NAMES[self.params.action_type], msg)
        chunk = self.loop.last_chunk if self.loop else None
        if chunk is not None and chunk is not self._last_chunk_seen:
            # The first command from a new chunk: the chunk's t0 is its image's arrival time.
            self._last_chunk_seen = chunk
            self.publish_latency_s.append(time.monotonic() - chunk.t0)
            if self.bag is not None:
                self.bag.inference(chunk, self.loop.metrics.inference_latency_s[-1], self.publish_latency_s[-1])

    # ---- lifecycle --------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._loop_thread is not None and self._loop_thread.is_alive()

    def set_profile(self, spec: str) -> None:
        """The governor calls this from the loop thread right after a chunk arrived, so no inference is in
        flight while the model changes."""
        self.profiles.set(spec)
        if self.loop is not None:
            self.loop.reuse_gate = self.profiles.reuse_gate()

    def start(self) -> str:
        if self._estopped:
            raise RuntimeError("e-stopped: call ~/reset first")
        if self.running:
            return "already running"
        self._worker = ThreadedInferenceWorker(self.policy, lanes=self.runtime.max_in_flight)
        self.loop = ControlLoop(self.robot, self._worker, self.runtime, reuse_gate=self.profiles.reuse_gate(),
                                governor=self.profiles.governor, set_profile=self.set_profile, delays=self.delays)
        self.run_metrics.append(self.loop.metrics)
        self._loop_thread = threading.Thread(target=self._run_loop, args=(self.loop,), name="control-loop",
                                             daemon=True)
        self._loop_thread.start()
        return "started"

    def _run_loop(self, loop: ControlLoop) -> None:
        while not loop.stop_requested and not self.robot.has_observation():  # nothing to act on before a frame
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
            self._estopped = True  # from here on no command is published, whatever thread ticks
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

    # ---- diagnostics ------------------------------------------------------------------------------
    def summary(self) -> dict:
        """Everything the diagnostics report, as a dict (over all runs since launch)."""
        latencies = [s for m in self.run_metrics for s in m.inference_latency_s]
        jitter = [s for m in self.run_metrics for s in m.tick_jitter_s]
        budget_ms = self.params.budget_ms
        message_faults, received = self.robot.faults()
        return {
            "state": "estopped" if self._estopped else "running" if self.running else "idle",
            "policy": self.params.policy, "profile": self.profiles.active,
            "profile_switches": [switch for m in self.run_metrics for switch in m.profile_switches],
            "ticks": sum(m.ticks for m in self.run_metrics),
            "commands_published": self.commands_published,
            "policy_calls": sum(m.policy_calls for m in self.run_metrics),
            "policy_errors": sum(len(m.policy_errors) for m in self.run_metrics),
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
            **smoothness([m.summary() for m in self.run_metrics]),
        }

    def publish_diagnostics(self) -> None:
        summary = self.summary()
        level = {"estopped": DiagnosticStatus.ERROR, "running": DiagnosticStatus.OK}.get(summary["state"],
                                                                                        DiagnosticStatus.WARN)
        if summary["state"] == "running" and (summary["message_faults"] or summary["loop_faults"]):
            level = DiagnosticStatus.WARN
        array = status_array(f"vla_runtime: {self.get_name()}", level, summary["state"], summary,
                             self.params.policy, self.get_clock().now().to_msg())
        self.diagnostics_publisher.publish(array)
        if self.bag is not None:
            self.bag.log("/diagnostics", STATUS_TYPE, array)

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
