"""The simulator bridge: a task of any registered suite (default Meta-World) on ROS 2 topics, stepped
on the wall clock.

Every step it applies the newest action command (when none arrived within `command_timeout_s`: zero,
except the suite's held dimensions such as a gripper, which keep their last value), publishes the joint
state, and every `camera_hz` the camera images. Episode status (json on `episode_topic`, latched) says
task, seed, step, success and done. When an episode ends it starts the next (`auto_reset`) or waits for
~/reset. `step_hz` below the suite's own rate (Meta-World: 80 Hz) runs it slower than real time, for
machines that cannot render and infer that fast. With `start_on_command` the first episode waits
(republishing its first frame) until the first action command arrives.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
from rclpy._rclpy_pybind11 import RCLError
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from std_srvs.srv import Trigger

from vla_runtime.data.messages import MessageRejected, action_from_msg
from vla_runtime.ros.common import LATCHED, answer_trigger, camera_topic, spin_node, suite_options
from vla_runtime.ros.messages import action_message_class, image_to_msg, state_to_joint_state
from vla_runtime.ros.parameters import BridgeParams, as_parameters, declare
from vla_runtime.sim.suite import Env, configured_suite

DEFAULT_CAMERA_HZ = 20.0  # a camera frame every step up to this rate (SIMPLER steps at 5 Hz, Meta-World at 80)


class SimBridgeNode(Node):
    def __init__(self, parameter_overrides: dict | None = None, node_name: str = "vla_sim_bridge"):
        super().__init__(node_name, parameter_overrides=as_parameters(parameter_overrides or {}, BridgeParams))
        # First: destroy_node() may run on a node whose construction failed half-way.
        self._closing = threading.Event()
        self._sim_thread: threading.Thread | None = None
        self.params = p = declare(self, BridgeParams)
        action_class = action_message_class(p.action_type)
        overrides = suite_options(p.suite_options)
        if p.camera_names:
            overrides["cameras"] = list(p.camera_names)
        if p.image_size:
            overrides["image_size"] = p.image_size
        self.suite, _ = configured_suite(p.suite, **overrides)
        self.spec = self.suite.spec
        self.task = self.suite.resolve_task(p.task)
        self.seeds = self.suite.seeds("eval")  # never a seed a policy was trained on
        self.step_hz = p.step_hz or 1.0 / self.spec.control_dt
        camera_hz = p.camera_hz or min(DEFAULT_CAMERA_HZ, self.step_hz)
        if camera_hz < 0 or camera_hz > self.step_hz:
            raise ValueError(f"camera_hz must be in (0, step_hz={self.step_hz:g}], got {camera_hz}")
        self.steps_per_frame = max(1, round(self.step_hz / camera_hz))

        self._lock = threading.Lock()
        self.command: np.ndarray | None = None
        self.command_received_s = 0.0
        self.commands_received = 0
        self.rejected_commands = 0
        self.episode = p.first_episode
        self.episodes_finished: list[dict] = []
        self.status: dict = {}
        self.done = False
        self.success = False
        self._reset_requested = threading.Event()

        self.image_publishers = {camera: self.create_publisher(Image, camera_topic(camera),
                                                               qos_profile_sensor_data)
                                 for camera in self.spec.cameras}
        self.state_publisher = self.create_publisher(JointState, p.joint_state_topic, qos_profile_sensor_data)
        self.instruction_publisher = self.create_publisher(String, p.instruction_topic, LATCHED)
        self.episode_publisher = self.create_publisher(String, p.episode_topic, LATCHED)
        self.create_subscription(action_class, p.action_topic, self._on_action, 10)
        self.create_service(Trigger, "~/reset", lambda _req, res: answer_trigger(self.reset_episode, res))
        # MuJoCo's GL context belongs to the thread that made it: one thread owns the simulator.
        ready: list = []
        started = threading.Event()
        self._sim_thread = threading.Thread(target=self._simulate, args=(ready, started), name="sim-bridge",
                                            daemon=True)
        self._sim_thread.start()
        started.wait()
        if isinstance(ready[0], Exception):
            raise ready[0]
        self.get_logger().info(f"{self.suite.name} {self.task}: {self.step_hz:g} steps/s "
                               f"({self.step_hz * self.spec.control_dt:.2f}x real time), cameras "
                               f"{list(self.spec.cameras)} at {self.step_hz / self.steps_per_frame:g} Hz")

    def _on_action(self, msg) -> None:
        try:
            action = action_from_msg(self.params.action_type, msg, self.spec.action_dim)
        except MessageRejected as error:
            self.rejected_commands += 1
            self.get_logger().warning(f"ignored action command: {error}", throttle_duration_sec=1.0)
            return
        with self._lock:
            self.command, self.command_received_s = action, time.monotonic()
            self.commands_received += 1

    def _current_command(self) -> np.ndarray:
        with self._lock:
            fresh = self.command is not None and \
                time.monotonic() - self.command_received_s <= self.params.command_timeout_s
            if fresh:
                return self.command
            hold = np.zeros(self.spec.action_dim)
            if self.command is not None:
                held = list(self.spec.hold_dims)
                hold[held] = self.command[held]
            return hold

    def _reset(self, env: Env, episode: int) -> None:
        self.episode = episode
        obs = env.reset(self.seeds.seed(episode), render=True)
        with self._lock:
            self.command = None
        self.done = False
        self.success = False
        self.instruction_publisher.publish(String(data=env.instruction))
        self._publish(obs, images=True)
        self._publish_status(env)

    def reset_episode(self) -> str:
        self._reset_requested.set()
        return f"episode {self.episode + 1} (seed {self.seeds.seed(self.episode + 1)}) starts at the next step"

    def _simulate(self, ready: list, started: threading.Event) -> None:
        try:
            env = self.suite.make_env(self.task, render=True, max_steps=self.params.max_steps or None)
            self._reset(env, self.episode)
            ready.append(env)
        except Exception as exc:  # reported by the constructor, in the caller's thread
            ready.append(exc)
            return
        finally:
            started.set()
        period = 1.0 / self.step_hz
        start = time.monotonic()
        tick = 0
        with env:
            while not self._closing.is_set() and self.context.ok():
                tick += 1
                time.sleep(max(0.0, start + tick * period - time.monotonic()))
                try:
                    self._tick(env, tick)
                except RCLError:
                    if self.context.ok():
                        raise
                    return  # a signal shut ROS down between our check and a publish

    def _tick(self, env: Env, tick: int) -> None:
        if self._reset_requested.is_set():
            self._reset_requested.clear()
            self._reset(env, self.episode + 1)
        elif self.commands_received == 0 and self.params.start_on_command:
            # The controller is not up yet: show it the first frame again instead of moving on.
            if tick % self.steps_per_frame == 0:
                self._publish(env.observe(render=True), images=True)
        elif not self.done:
            self._step(env)

    def _step(self, env: Env) -> None:
        render = (env.steps + 1) % self.steps_per_frame == 0
        obs, _, success, truncated, _ = env.step(self._current_command(), render=render)
        self.success = self.success or success
        self.done = success or truncated
        self._publish(obs, images=render)
        if self.done or env.steps % 10 == 0:
            self._publish_status(env)
        if self.done:
            self.episodes_finished.append(dict(self.status))
            self.get_logger().info(f"episode {self.episode}: {'success' if self.success else 'failure'} "
                                   f"after {env.steps} steps")
            if self.params.auto_reset:
                self._reset(env, self.episode + 1)

    def _publish(self, obs, images: bool) -> None:
        stamp = self.get_clock().now().to_msg()
        if images:
            for camera, image in obs.images.items():
                self.image_publishers[camera].publish(image_to_msg(image, stamp, camera))
        names = self.spec.state_names or [f"state_{i}" for i in range(len(obs.state))]
        self.state_publisher.publish(state_to_joint_state(obs.state, list(names), stamp))

    def _publish_status(self, env: Env) -> None:
        self.status = {"task": env.task, "episode": self.episode, "seed": self.seeds.seed(self.episode),
                       "step": env.steps, "success": bool(self.success), "done": bool(self.done),
                       "instruction": env.instruction, "commands_received": self.commands_received,
                       "rejected_commands": self.rejected_commands}
        self.episode_publisher.publish(String(data=json.dumps(self.status)))

    def destroy_node(self) -> None:
        self._closing.set()
        if self._sim_thread is not None:
            self._sim_thread.join(timeout=5.0)
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    """`ros2 run vla_runtime sim_bridge --ros-args -p task:=drawer-close-v3 ...`"""
    spin_node(SimBridgeNode, args)


if __name__ == "__main__":
    main()
