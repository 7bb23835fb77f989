"""`sft`: supervised fine-tuning of LLMs through plugins.

The public API for plugin authors::

    from sft.core import hookimpl, ChatTemplate, DatasetFormat, Exporter, Logger, Message, Segment
"""

from .errors import ConfigError, DataError, PluginError, SftError
from .hookspecs import hookimpl
from .interfaces import (
    ChatTemplate,
    DatasetFormat,
    Exporter,
    ExportResult,
    HubCard,
    Logger,
    Message,
    RunInfo,
    Segment,
    TrainingBackend,
)

__all__ = [
    "hookimpl",
    "ChatTemplate",
    "DatasetFormat",
    "Exporter",
    "ExportResult",
    "HubCard",
    "Logger",
    "Message",
    "RunInfo",
    "Segment",
    "TrainingBackend",
    "ConfigError",
    "DataError",
    "PluginError",
    "SftError",
]
