"""Task streams for continual learning: the 15-task CL benchmark (orders 1-6) and custom YAML/JSON streams."""

from jumplora.data.custom import StreamSource, load_custom_stream, load_stream, resolve_stream_source
from jumplora.data.presets import BENCHMARK_TASKS, LONG_ORDERS, ORDERS, STANDARD_ORDERS, TaskPreset
from jumplora.data.safe import DataError
from jumplora.data.stream import (
    ENV_VAR,
    SPLITS,
    Example,
    Task,
    TaskStream,
    load_benchmark_stream,
    resolve_data_dir,
    sample_cap,
    stream_fingerprint,
)

__all__ = [
    "BENCHMARK_TASKS",
    "ENV_VAR",
    "LONG_ORDERS",
    "ORDERS",
    "SPLITS",
    "STANDARD_ORDERS",
    "DataError",
    "Example",
    "StreamSource",
    "Task",
    "TaskPreset",
    "TaskStream",
    "load_benchmark_stream",
    "load_custom_stream",
    "load_stream",
    "resolve_data_dir",
    "resolve_stream_source",
    "sample_cap",
    "stream_fingerprint",
]
