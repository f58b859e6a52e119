"""ROS 2 control node, simulator bridge and message conversion (extra: vla-runtime[ros])."""
