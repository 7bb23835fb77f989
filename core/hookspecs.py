"""The hook specifications of `sft`: one per plugin kind.

Every hook registers named objects through a ``register`` callback, so one plugin module
can provide several of them. The core owns de-duplication: a second object with a name
already taken is an error that names both plugins.

A plugin implements any subset of these hooks::

    from sft.core import hookimpl

    @hookimpl
    def register_chat_templates(register):
        register(MyTemplate())

and declares itself under the ``sft`` entry-point group of its distribution::

    [project.entry-points.sft]
    my_plugin = "my_package.sft_plugin"
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from .interfaces import ChatTemplate, DatasetFormat, Exporter, Logger, Objective, Publisher, TrainingBackend

__all__ = ["hookspec", "hookimpl"]

hookspec = pluggy.HookspecMarker("sft")
hookimpl = pluggy.HookimplMarker("sft")


@hookspec
def register_dataset_formats(register: "Callable[[DatasetFormat], None]") -> None:
    """Register dataset formats: objects that turn one raw row into one conversation.

    Called once, when the plugin manager first builds its registry (before any config is
    validated), so that ``data.format`` and ``data.<format>.*`` options can be checked.

    :param register: call ``register(fmt)`` once per :class:`~sft.core.interfaces.DatasetFormat`.
    :return: nothing; the return value is ignored.
    """


@hookspec
def register_chat_templates(register: "Callable[[ChatTemplate], None]") -> None:
    """Register chat templates: objects that own rendering, stop tokens, Jinja and Ollama text.

    Called once, when the plugin manager first builds its registry (before any config is
    validated), so that ``template.name`` and ``template.<name>.*`` options can be checked.

    :param register: call ``register(template)`` once per :class:`~sft.core.interfaces.ChatTemplate`.
    :return: nothing; the return value is ignored.
    """


@hookspec
def register_loggers(register: "Callable[[Logger], None]") -> None:
    """Register metric loggers: objects that receive the run's start, every logged step and its end.

    Called once, when the plugin manager first builds its registry (before any config is
    validated), so that ``loggers.enabled`` and ``loggers.<name>.*`` options can be checked.

    :param register: call ``register(logger)`` once per :class:`~sft.core.interfaces.Logger`.
    :return: nothing; the return value is ignored.
    """


@hookspec
def register_exporters(register: "Callable[[Exporter], None]") -> None:
    """Register exporters: objects that write a trained run out in some format (adapter, GGUF, ...).

    Called once, when the plugin manager first builds its registry (before any config is
    validated), so that ``export.enabled`` and ``export.<name>.*`` options can be checked.

    :param register: call ``register(exporter)`` once per :class:`~sft.core.interfaces.Exporter`.
    :return: nothing; the return value is ignored.
    """


@hookspec
def register_backends(register: "Callable[[TrainingBackend], None]") -> None:
    """Register training backends: objects that load the model and attach LoRA on one kind of hardware.

    Called once, when the plugin manager first builds its registry. ``model.backend: auto``
    picks the first available backend in descending ``priority`` (Unsloth on CUDA, then
    plain transformers).

    :param register: call ``register(backend)`` once per :class:`~sft.core.interfaces.TrainingBackend`.
    :return: nothing; the return value is ignored.
    """


@hookspec
def register_publishers(register: "Callable[[Publisher], None]") -> None:
    """Register publishers: objects that send a run's finished exports somewhere (the Hugging Face Hub, a folder).

    Called once, when the plugin manager first builds its registry (before any config is
    validated), so that ``publish.enabled`` and ``publish.<name>.*`` options can be checked.
    The engine calls every enabled publisher's ``preflight`` before training, ``start`` before
    the first export is published and ``publish`` for each export as soon as it is written.

    :param register: call ``register(publisher)`` once per :class:`~sft.core.interfaces.Publisher`.
    :return: nothing; the return value is ignored.
    """


@hookspec
def register_objectives(register: "Callable[[Objective], None]") -> None:
    """Register training objectives: what the trainer optimises (sft, dpo, orpo, kto, simpo, ...).

    Called once, when the plugin manager first builds its registry (before any config is
    validated), so that ``objective.name`` and ``objective.<name>.*`` options can be checked.
    The engine prepares rows of the objective's ``row_kind`` and the model, then calls its
    ``build_trainer``.

    :param register: call ``register(objective)`` once per :class:`~sft.core.interfaces.Objective`.
    :return: nothing; the return value is ignored.
    """
