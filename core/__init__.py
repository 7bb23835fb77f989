"""`sft`: supervised fine-tuning of LLMs through plugins.

The public API for plugin authors::

    from sft.core import hookimpl, ChatTemplate, DatasetFormat, Exporter, Logger, Message, Objective, Publisher, Segment
"""

from .errors import ConfigError, DataError, PluginError, SftError
from .hookspecs import hookimpl
from .interfaces import (
    ChatTemplate,
    DatasetFormat,
    Exporter,
    ExportContext,
    ExportResult,
    HubCard,
    Logger,
    Message,
    Objective,
    Preference,
    Publisher,
    RunInfo,
    Segment,
    TrainerSetup,
    TrainingBackend,
)

__all__ = [
    "hookimpl",
    "ChatTemplate",
    "DatasetFormat",
    "Exporter",
    "ExportContext",
    "ExportResult",
    "HubCard",
    "Logger",
    "Message",
    "Objective",
    "Preference",
    "Publisher",
    "RunInfo",
    "Segment",
    "TrainerSetup",
    "TrainingBackend",
    "ConfigError",
    "DataError",
    "PluginError",
    "SftError",
]
