"""ROS 2 bags: write MCAP episode logs that survive a crash, read MCAP and sqlite3 bags back.

Messages are CDR-serialized ROS 2 messages with `ros2msg` schemas, as rosbag2's MCAP storage writes
them, so `ros2 bag info/play` open our logs. Writing is unchunked and the file is flushed on demand
(`flush()`): a process killed with SIGKILL leaves every message up to the last flush readable.
Reading needs no ROS installation: MCAP through mcap-ros2-support's decoder (built from the schema in the
file; it tolerates the trailing padding rclpy's serializer leaves), sqlite3 through rosbags' type store.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcap.exceptions import McapError
from mcap.records import Channel, Message, Schema
from mcap.stream_reader import StreamReader
from mcap.writer import Writer
from mcap_ros2.decoder import DecoderFactory
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

TYPESTORE_DISTRO = Stores.ROS2_KILTED


class BagError(ValueError):
    """A bag that cannot be read as asked: names the file and, where it applies, the topic."""


@dataclass
class BagMessage:
    topic: str
    msgtype: str  # e.g. sensor_msgs/msg/Image
    log_time_ns: int
    message: Any  # decoded: attribute access like the ROS message (header.stamp.sec, data, ...)


def message_definition(msgtype: str) -> str:
    """The ros2msg text (with its dependencies) that rosbag2 stores as a schema."""
    text, _ = get_typestore(TYPESTORE_DISTRO).generate_msgdef(msgtype, ros_version=2)
    return text


class McapBagWriter:
    """Thread-safe; `write` takes serialized CDR bytes (e.g. rclpy.serialization.serialize_message)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.suffix != ".mcap":
            raise ValueError(f"An MCAP bag path must end in .mcap, got {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._writer = Writer(self._file, use_chunking=False)
        self._writer.start(profile="ros2", library="vla_runtime")
        self._channels: dict[str, int] = {}
        self._schemas: dict[str, int] = {}
        self._lock = threading.Lock()
        self.message_count = 0

    def _channel(self, topic: str, msgtype: str) -> int:
        if topic not in self._channels:
            if msgtype not in self._schemas:
                self._schemas[msgtype] = self._writer.register_schema(
                    msgtype, "ros2msg", message_definition(msgtype).encode())
            self._channels[topic] = self._writer.register_channel(topic, "cdr", self._schemas[msgtype])
        return self._channels[topic]

    def write(self, topic: str, msgtype: str, data: bytes, log_time_ns: int) -> None:
        with self._lock:
            if self._file.closed:
                return
            self._writer.add_message(self._channel(topic, msgtype), log_time=log_time_ns, data=data,
                                     publish_time=log_time_ns, sequence=self.message_count)
            self.message_count += 1

    def flush(self) -> None:
        """Hand everything written so far to the operating system (survives the process being killed)."""
        with self._lock:
            if not self._file.closed:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._writer.finish()
                self._file.close()


def bag_files(path: str | Path) -> list[Path]:
    """The storage files of a bag: an .mcap / .db3 file, or a rosbag2 directory holding them."""
    path = Path(path)
    if not path.exists():
        raise BagError(f"Bag not found: {path}")
    if path.is_file():
        if path.suffix not in (".mcap", ".db3"):
            raise BagError(f"{path}: not a ROS 2 bag (expected .mcap or .db3)")
        return [path]
    files = sorted([*path.glob("*.mcap"), *path.glob("*.db3")])
    if not files:
        raise BagError(f"{path}: a directory without .mcap or .db3 files is not a ROS 2 bag")
    return files


def _read_mcap(path: Path, topics: set[str] | None) -> Iterator[BagMessage]:
    factory = DecoderFactory()
    schemas: dict[int, Schema] = {}
    decoders: dict[int, Any] = {}
    channels: dict[int, Channel] = {}
    with open(path, "rb") as stream:
        try:
            for record in StreamReader(stream, skip_magic=False).records:
                if isinstance(record, Schema):
                    schemas[record.id] = record
                    decoders[record.id] = factory.decoder_for("cdr", record)
                elif isinstance(record, Channel):
                    channels[record.id] = record
                elif isinstance(record, Message):
                    channel = channels[record.channel_id]
                    if topics is not None and channel.topic not in topics:
                        continue
                    yield BagMessage(channel.topic, schemas[channel.schema_id].name, record.log_time,
                                     decoders[channel.schema_id](record.data))
        except (McapError, EOFError, KeyError, ValueError) as exc:
            detail = str(exc) or type(exc).__name__
            raise BagError(f"{path}: truncated or corrupt MCAP ({detail})") from exc


def _read_sqlite3(path: Path, topics: set[str] | None) -> Iterator[BagMessage]:
    typestore = get_typestore(TYPESTORE_DISTRO)
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
            topic_rows = connection.execute("SELECT id, name, type FROM topics").fetchall()
            try:
                definitions = dict(connection.execute("SELECT topic_type, encoded_message_definition "
                                                      "FROM message_definitions WHERE encoding = 'ros2msg'"))
            except sqlite3.OperationalError:  # bags older than ROS 2 Iron store no definitions
                definitions = {}
            by_id = {topic_id: (name, msgtype) for topic_id, name, msgtype in topic_rows}
            for msgtype in {msgtype for _, msgtype in by_id.values()}:
                if msgtype not in typestore.types and definitions.get(msgtype):
                    typestore.register(get_types_from_msg(definitions[msgtype], msgtype))
            rows = connection.execute("SELECT topic_id, timestamp, data FROM messages ORDER BY timestamp")
            for topic_id, timestamp, data in rows:
                name, msgtype = by_id[topic_id]
                if topics is None or name in topics:
                    yield BagMessage(name, msgtype, timestamp, typestore.deserialize_cdr(data, msgtype))
    except (sqlite3.DatabaseError, KeyError, ValueError) as exc:
        raise BagError(f"{path}: truncated or corrupt sqlite3 bag ({exc})") from exc


def read_bag(path: str | Path, topics: list[str] | None = None) -> Iterator[BagMessage]:
    """Messages of a bag in file order (MCAP) or time order (sqlite3), decoded. A truncated file yields
    what it holds, then raises BagError naming the file."""
    wanted = set(topics) if topics is not None else None
    for file in bag_files(path):
        reader = _read_mcap if file.suffix == ".mcap" else _read_sqlite3
        yield from reader(file, wanted)


def bag_topic_names(path: str | Path) -> set[str]:
    """The topics a bag declares (MCAP channels, sqlite3 topics table), without decoding messages."""
    names: set[str] = set()
    for file in bag_files(path):
        if file.suffix == ".db3":
            with closing(sqlite3.connect(f"file:{file}?mode=ro", uri=True)) as connection:
                names.update(name for (name,) in connection.execute("SELECT name FROM topics"))
            continue
        with open(file, "rb") as stream:
            try:
                for record in StreamReader(stream, skip_magic=False).records:
                    if isinstance(record, Channel):
                        names.add(record.topic)
            except (McapError, EOFError, ValueError):
                pass  # a truncated file: the channels before the cut are what it has
    return names
