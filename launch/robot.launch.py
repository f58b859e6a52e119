"""`ros2 launch vla_runtime robot.launch.py [policy:=ref_dit] [accel:=bac] [control_hz:=20.0] [budget_ms:=50.0]
[use_sim:=true] [task:=door-open-v3] [log_bag:=/tmp/episode.mcap] ...`

Starts the control node and, with use_sim, the simulator bridge (Meta-World unless suite:= says otherwise), whose
suite the control node then gets too; without use_sim the control node has no suite (a real robot's contract
comes from robot_file:=arm.yaml, or the node's parameters under configs/robot.yaml's `control:`).
Argument defaults come from the package's configs/robot.yaml, the same file vla-robot reads, so both start the
same nodes with the same parameters; `--show-args` prints what each argument is.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import IfElseSubstitution, LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from vla_runtime.ros import BRIDGE_KEYS, CONTROL_KEYS, LAUNCH_ARGUMENTS, robot_defaults


def generate_launch_description() -> LaunchDescription:
    defaults = robot_defaults()

    def argument(name: str) -> ParameterValue:
        # Typed like its default: an empty string stays a string, "20" becomes 20.0 where a float is due.
        return ParameterValue(LaunchConfiguration(name), value_type=type(defaults[name]))

    control = {name: argument(name) for name in CONTROL_KEYS}
    # The bridge's suite, with use_sim; without, none: a real robot's contract is its own (robot_file, ...).
    suite = IfElseSubstitution(LaunchConfiguration("use_sim"), LaunchConfiguration("suite"), "")
    control["suite"] = ParameterValue(suite, value_type=str)
    bridge = {name: argument(name) for name in BRIDGE_KEYS}
    bridge["step_hz"] = argument("control_hz")
    return LaunchDescription([
        *(DeclareLaunchArgument(name, description=description,
                                default_value=str(defaults[name]).lower() if isinstance(defaults[name], bool)
                                else str(defaults[name])) for name, description in LAUNCH_ARGUMENTS.items()),
        Node(package="vla_runtime", executable="sim_bridge", name="vla_sim_bridge", output="screen",
             parameters=[bridge, defaults["bridge"]], condition=IfCondition(LaunchConfiguration("use_sim"))),
        Node(package="vla_runtime", executable="control_node", name="vla_control", output="screen",
             parameters=[control, defaults["control"]]),
    ])
