"""The simulator bridge: a Meta-World task on ROS 2 topics, stepped on the wall clock.

Every step it applies the newest action command (zero motion, gripper held, when none arrived within
`command_timeout_s`), publishes the joint state, and every `camera_hz` the camera images. Episode status
(json on `episode_topic`, latched) says task, seed, step, success and done. When an episode ends it starts
the next (`auto_reset`) or waits for ~/reset. `step_hz` below the simulator's 80 Hz runs it slower than
real time, for machines that cannot render and infer that fast. With `start_on_command` the first
episode waits (republishing its first frame) until the first action command arrives.
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

from vla_runtime.ros.common import LATCHED, answer_trigger, as_parameters, spin_node
from vla_runtime.ros.messages import (
    MessageRejected,
    action_from_msg,
    action_message_class,
    image_to_msg,
    state_to_joint_state,
)
from vla_runtime.sim.metaworld_suite import CONTROL_DT, MetaWorldConfig, MetaWorldEnv, resolve_task

STATE_NAMES = ["hand_x", "hand_y", "hand_z", "gripper"]
ACTION_DIM = 4


class SimBridgeNode(Node):
    def __init__(self, parameter_overrides: dict | None = None, node_name: str = "vla_sim_bridge"):
        super().__init__(node_name, parameter_overrides=as_parameters(parameter_overrides or {}))
        # First: destroy_node() may run on a node whose construction failed half-way.
        self._closing = threading.Event()
        self._sim_thread: threading.Thread | None = None
        defaults = {
            "task": "drawer-close-v3", "first_episode": 0, "camera_names": ["corner4"], "image_size": 128,
            "step_hz": 0.0, "camera_hz": 20.0, "max_steps": 200, "auto_reset": True, "start_on_command": True,
            "command_timeout_s": 0.5,
            "joint_state_topic": "/joint_states", "instruction_topic": "/instruction",
            "action_topic": "/vla/action", "action_type": "joint_trajectory", "episode_topic": "/sim/episode",
        }
        p = {name: self.declare_parameter(name, default).value for name, default in defaults.items()}
        self.params = p
        action_class = action_message_class(p["action_type"])
        self.config = MetaWorldConfig(cameras=tuple(p["camera_names"]), image_size=p["image_size"],
                                      default_max_steps=p["max_steps"])
        self.task = resolve_task(p["task"])
        self.seeds = self.config.seeds("eval")  # never a seed a policy was trained on
        self.step_hz = p["step_hz"] or 1.0 / CONTROL_DT
        if p["camera_hz"] <= 0 or p["camera_hz"] > self.step_hz:
            raise ValueError(f"camera_hz must be in (0, step_hz={self.step_hz:g}], got {p['camera_hz']}")
        self.steps_per_frame = max(1, round(self.step_hz / p["camera_hz"]))

        self._lock = threading.Lock()
        self.command: np.ndarray | None = None
        self.command_received_s = 0.0
        self.commands_received = 0
        self.rejected_commands = 0
        self.episode = p["first_episode"]
        self.episodes_finished: list[dict] = []
        self.status: dict = {}
        self.done = False
        self.success = False
        self._reset_requested = threading.Event()

        self.image_publishers = {camera: self.create_publisher(Image, f"/camera/{camera}/image_raw",
                                                               qos_profile_sensor_data)
                                 for camera in self.config.cameras}
        self.state_publisher = self.create_publisher(JointState, p["joint_state_topic"], qos_profile_sensor_data)
        self.instruction_publisher = self.create_publisher(String, p["instruction_topic"], LATCHED)
        self.episode_publisher = self.create_publisher(String, p["episode_topic"], LATCHED)
        self.create_subscription(action_class, p["action_topic"], self._on_action, 10)
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
        self.get_logger().info(f"{self.task}: {self.step_hz:g} steps/s ({self.step_hz * CONTROL_DT:.2f}x "
                               f"real time), cameras {list(self.config.cameras)} at "
                               f"{self.step_hz / self.steps_per_frame:g} Hz")

    def _on_action(self, msg) -> None:
        try:
            action = action_from_msg(self.params["action_type"], msg, ACTION_DIM)
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
                time.monotonic() - self.command_received_s <= self.params["command_timeout_s"]
            if fresh:
                return self.command
            hold = np.zeros(ACTION_DIM)
            hold[3] = self.command[3] if self.command is not None else 0.0
            return hold

    def _reset(self, env: MetaWorldEnv, episode: int) -> None:
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
            env = MetaWorldEnv(self.task, self.config, render=True)
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

    def _tick(self, env: MetaWorldEnv, tick: int) -> None:
        if self._reset_requested.is_set():
            self._reset_requested.clear()
            self._reset(env, self.episode + 1)
        elif self.commands_received == 0 and self.params["start_on_command"]:
            # The controller is not up yet: show it the first frame again instead of moving on.
            if tick % self.steps_per_frame == 0:
                self._publish(env.observe(render=True), images=True)
        elif not self.done:
            self._step(env)

    def _step(self, env: MetaWorldEnv) -> None:
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
            if self.params["auto_reset"]:
                self._reset(env, self.episode + 1)

    def _publish(self, obs, images: bool) -> None:
        stamp = self.get_clock().now().to_msg()
        if images:
            for camera, image in obs.images.items():
                self.image_publishers[camera].publish(image_to_msg(image, stamp, camera))
        self.state_publisher.publish(state_to_joint_state(obs.state, STATE_NAMES, stamp))

    def _publish_status(self, env: MetaWorldEnv) -> None:
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
