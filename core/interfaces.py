"""The interfaces that plugins implement, one per plugin kind.

Every registrable object has a ``name`` (what configs select it by), a ``version`` (part of
cache keys and of ``sft plugins``), a one-line ``description`` and an optional ``options``
dataclass. The options dataclass becomes the config node ``<section>.<name>`` (for example
``export.gguf``), so it is validated, documented and listed by the same machinery as the
core config. ``unsupported_reason`` lets any plugin say why it cannot run here; the core
turns that into a clear error before any work starts, and the matrix tests skip with it.

Heavy libraries (torch, transformers, ...) are imported inside methods, never at the top of
a plugin module: ``sft --help`` and ``sft plugins`` import every plugin.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Collection, Mapping, Protocol, Sequence, TypeVar

from .errors import SftError

if TYPE_CHECKING:
    from .env import Environment
    from .rundir import RunDir

T = TypeVar("T")

__all__ = [
    "ROLES",
    "ToolCall",
    "Message",
    "Conversation",
    "Segment",
    "ROW_KINDS",
    "Preference",
    "Plugin",
    "DatasetFormat",
    "ChatTemplate",
    "Logger",
    "RunInfo",
    "Exporter",
    "EvalModel",
    "ExportResult",
    "HubCard",
    "ExportContext",
    "Publisher",
    "TrainingBackend",
    "TrainerSetup",
    "Objective",
    "KINDS",
    "tools_of",
]

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ToolCall:
    """One function call an assistant turn makes (OpenAI's ``tool_calls[i].function`` plus its ``id``).

    ``arguments`` is the parsed JSON object; a format that has only the JSON text may pass the
    string, and :func:`sft.core.formats.validate_conversation` reports it when it is not a JSON object.
    """

    name: str
    arguments: Any = field(default_factory=dict)
    id: str | None = None


@dataclass(frozen=True)
class Message:
    """One turn of a conversation. ``role`` is one of :data:`ROLES`.

    The optional fields default to "absent", so ``Message(role, content)`` keeps meaning what it
    always did. An assistant turn may carry ``tool_calls`` (then ``content`` may be empty) and
    ``reasoning`` (its thinking trace, rendered the way the template renders reasoning); a
    ``tool`` turn's ``content`` is the result of the call named by ``tool_call_id`` / ``name``.
    """

    role: str
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    reasoning: str | None = None


class Conversation(list):
    """A list of :class:`Message` that also carries the row's ``tools`` (JSON-schema function specs).

    It *is* a ``list[Message]``, so code that takes a plain list keeps working; slicing keeps the
    tools (a template renders ``messages[:i]`` with the same tools). ``tools`` holds OpenAI-style
    ``{"type": "function", "function": {name, description, parameters}}`` objects. Read it with
    :func:`tools_of`, which also accepts a plain list (no tools).
    """

    def __init__(self, messages: Sequence[Message] = (), tools: Sequence[Mapping[str, Any]] = ()):
        super().__init__(messages)
        self.tools: list[dict[str, Any]] = [dict(t) for t in tools]

    def __getitem__(self, index):  # type: ignore[override]
        item = super().__getitem__(index)
        return Conversation(item, self.tools) if isinstance(index, slice) else item

    def __repr__(self) -> str:
        return f"Conversation({list.__repr__(self)}, tools={self.tools!r})"

    def __eq__(self, other: object) -> bool:
        return list.__eq__(self, other) and tools_of(self) == tools_of(other)  # type: ignore[arg-type]

    __hash__ = None  # type: ignore[assignment]


def tools_of(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The tools a conversation declares: ``messages.tools`` of a :class:`Conversation`, else none."""
    return list(getattr(messages, "tools", None) or [])


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text and whether its tokens are trained (get labels).

    ``reasoning`` marks a trained segment that is an assistant's reasoning (its think block):
    ``data.train_on: assistant_no_reasoning`` leaves those untrained.
    """

    text: str
    trained: bool
    reasoning: bool = False


#: The kinds of rows a dataset format produces and an objective trains on: ``conversation``
#: (supervised turns), ``pair`` (a prompt with a chosen and a rejected completion: DPO, ORPO,
#: SimPO) and ``labelled`` (a prompt with one completion marked desirable or not: KTO).
ROW_KINDS = ("conversation", "pair", "labelled")


@dataclass(frozen=True)
class Preference:
    """One row of preference data: the prompt's turns and the completion(s) judged.

    A pair (``row_kind = "pair"``) has ``chosen`` and ``rejected``; an unpaired row
    (``row_kind = "labelled"``) has its completion in ``chosen`` and ``label`` (True: desirable).
    ``prompt`` is a list of :class:`Message` (a :class:`Conversation` when the row declares
    tools) ending with the turn the completion answers; each completion is one assistant
    :class:`Message` (with its reasoning or tool calls, if any), rendered by the run's template.
    """

    prompt: Sequence[Message]
    chosen: Message
    rejected: Message | None = None
    label: bool | None = None

    @property
    def kind(self) -> str:
        """``pair`` or ``labelled``."""
        return "pair" if self.rejected is not None else "labelled"

    def completions(self) -> list[Message]:
        """The completion(s): chosen then rejected for a pair, the one completion otherwise."""
        return [self.chosen] if self.rejected is None else [self.chosen, self.rejected]


class Plugin(ABC):
    """What every registrable object has."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    #: A dataclass type whose fields become the config node ``<section>.<name>``; None for no options.
    options: ClassVar[type | None] = None

    def unsupported_reason(self, env: "Environment", options: Any = None) -> str | None:
        """Why this plugin cannot run in ``env`` with ``options``, or None when it can."""
        return None


class DatasetFormat(Plugin):
    """Turns one raw dataset row into one conversation (or, for a raw-text format, into segments).

    The core handles files, the hub, splits and bad-row policy; it validates every returned
    conversation (roles alternate, an assistant turn exists, nothing is empty) so formats
    don't have to. A format only reads its columns.

    A conversation format implements :meth:`to_conversation`; the run's chat template renders
    it. A raw-text format (``text``, ``completion``: continued pre-training, prompt/completion
    pairs) implements :meth:`to_segments` instead: its text is trained as it stands, with no
    chat template, and the core ends each row with the tokenizer's end-of-sequence token.
    """

    #: Columns whose presence means "this is my format" for ``data.format: auto``.
    columns: ClassVar[tuple[str, ...]] = ()
    #: The rows this format produces (one of :data:`ROW_KINDS`): ``conversation`` formats implement
    #: :meth:`to_conversation` (or :meth:`to_segments`); ``pair`` and ``labelled`` formats implement
    #: :meth:`to_preference`. ``data.format: auto`` only considers formats of the kind the run's
    #: objective trains on.
    row_kind: ClassVar[str] = "conversation"
    #: A few valid raw rows written by the plugin's author. The matrix tests (sft's and a
    #: plugin author's, through the test kit) build their data from them; optional.
    sample_rows: ClassVar[tuple[Mapping[str, Any], ...]] = ()

    def detect(self, columns: Collection[str], options: Any = None) -> bool:
        """True when a dataset with these columns is in this format (used by ``format: auto``)."""
        return bool(self.columns) and all(c in columns for c in self.columns)

    def to_conversation(self, row: Mapping[str, Any], options: Any = None) -> list[Message]:
        """Normalize ``row`` into a list of :class:`Message` (a :class:`Conversation` when the row declares tools).

        Raise :class:`~sft.core.errors.DataError` with ``field=`` for a missing, null or
        malformed field; the core adds the file, line and row.
        """
        raise NotImplementedError(f"dataset format '{self.name}' implements neither to_conversation nor to_segments")

    def to_segments(self, row: Mapping[str, Any], options: Any = None) -> list[Segment] | None:
        """A raw-text format's row as :class:`Segment` objects (``trained`` or not), rendered as they
        stand (no chat template). None, the default, means "a conversation format": the core
        calls :meth:`to_conversation`. Errors as in :meth:`to_conversation`."""
        return None

    def plain_turns(self, row: Mapping[str, Any], options: Any = None) -> list[tuple[str, str]] | None:
        """Optional speed-up: ``row`` as ``(role, text)`` pairs when :meth:`to_conversation` would return exactly
        those as plain :class:`Message` objects (nothing else set, no tools); None, the default, whenever in doubt:
        the core then calls :meth:`to_conversation`, which also names any error."""
        return None

    def to_preference(self, row: Mapping[str, Any], options: Any = None) -> Preference:
        """A ``pair`` or ``labelled`` format's row as a :class:`Preference`. The core checks the
        prompt and each completion like any conversation, and that a pair's completions differ.
        Errors as in :meth:`to_conversation`."""
        raise NotImplementedError(f"dataset format '{self.name}' reads {self.row_kind} rows, not preference rows")

    def read_columns(self, options: Any = None) -> Collection[str] | None:
        """The columns this format reads (with ``options``). The core counts every other column a
        row carries and names them in a notice, so nothing is dropped silently. None, the
        default: the format does not say, and nothing is counted."""
        return None

    def unread(self, row: Mapping[str, Any], options: Any = None) -> list[str]:
        """What ``row`` carries that this format does not read: by default the non-empty columns outside
        :meth:`read_columns`. A format with nested records adds their unread keys (``messages[].loss_weight``)."""
        read = self.read_columns(options)
        if read is None:
            return []
        return [k for k, v in row.items() if k not in read and v not in (None, "", [])]


class ChatTemplate(Plugin):
    """Owns everything about one chat format, so training, the saved tokenizer, GGUF and Ollama agree.

    ``tokenizer`` arguments are Hugging Face tokenizers; templates that are pure text may
    ignore them. Rendered text is tokenized *without* adding special tokens, so a template
    that wants a BOS token puts it in its text.
    """

    def render_plain(self, turns: Sequence[tuple[str, str]], tokenizer: Any = None) -> list[str] | None:
        """Optional speed-up: :meth:`render` of plain ``(role, text)`` turns (:meth:`DatasetFormat.plain_turns`) as
        texts alternating untrained and trained, the first untrained (``""`` where one is empty), with the text and
        trained characters of :meth:`render`'s segments. None, the default: the core calls :meth:`render`."""
        return None

    def configure(self, options: Any) -> "ChatTemplate":
        """This template with the run's ``template.<name>`` options applied (``options`` is an
        instance of :attr:`options`, or None for a template without options).

        One instance of each template is registered and shared, and the rendering methods take
        no options, so a template with options returns a configured copy here. The core calls
        this through :func:`sft.core.templating.resolve_template` wherever a run needs its
        template: data, training, exports and generation. The default returns ``self``.
        """
        return self

    @abstractmethod
    def render(self, messages: Sequence[Message], tokenizer: Any = None) -> list[Segment]:
        """Render a whole conversation into segments.

        Each assistant turn's content, tool calls, reasoning and its end-of-turn token(s) are
        in segments with ``trained=True`` (reasoning ones also with ``reasoning=True``);
        everything else (system, user and tool turns, the tools preamble of
        :func:`tools_of` ``(messages)``) is ``trained=False``. The concatenated text equals
        what :meth:`jinja` renders for the same messages and tools. A template without a
        tool-call or reasoning format raises :class:`~sft.core.errors.SftError` for such a
        row rather than dropping what it cannot render.
        """

    @abstractmethod
    def generation_prompt(self, messages: Sequence[Message], tokenizer: Any = None) -> str:
        """The text to feed the model so that it writes the next assistant turn."""

    @abstractmethod
    def stop_tokens(self, tokenizer: Any = None) -> list[str]:
        """The stop strings, end-of-turn token first. The first one is trained at the end of every assistant turn."""

    @abstractmethod
    def jinja(self, tokenizer: Any = None) -> str:
        """The Jinja ``chat_template`` installed into every saved tokenizer and GGUF."""

    @abstractmethod
    def ollama_template(self, tokenizer: Any = None) -> str:
        """The Go-template ``TEMPLATE`` of an Ollama Modelfile for this format."""


@dataclass
class RunInfo:
    """What a logger learns when a run starts."""

    name: str
    run_dir: str
    config: dict[str, Any]
    total_steps: int | None = None
    resumed_from_step: int = 0
    #: The model being trained, for loggers that watch gradients (``loggers.wandb.watch``); None when not given.
    model: Any = field(default=None, repr=False, compare=False)


class Logger(Plugin):
    """Receives metrics. Instances are reused across runs, so :meth:`start` resets any state.

    A logger that raises is reported once and disabled; the run continues.
    """

    @abstractmethod
    def start(self, run: RunInfo, options: Any = None) -> None:
        """Called once before the first training step."""

    @abstractmethod
    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Called at every logging step (train metrics) and after every evaluation (``eval_*`` keys)."""

    @abstractmethod
    def finish(self, summary: Mapping[str, Any]) -> None:
        """Called once with the final summary (also after a failed run, with ``status`` set)."""


@dataclass
class ExportResult:
    """What one exporter produced. ``details`` is free-form JSON (sizes, timings, verification)."""

    exporter: str
    ok: bool
    paths: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @classmethod
    def from_summary(cls, exporter: str, entry: Mapping[str, Any]) -> "ExportResult":
        """The result as ``summary.json`` recorded it under ``exports.<exporter>``."""
        return cls(exporter, ok=bool(entry.get("ok")), paths=list(entry.get("paths") or []),
                   details=dict(entry.get("details") or {}), error=entry.get("error"))


@dataclass
class HubCard:
    """What one export adds to the model card of the Hub repo it is pushed to (``publish.hub``, docs/hub.md)."""

    #: The card's ``library_name`` (``peft``, ``transformers``, ``gguf`` ...).
    library_name: str | None = None
    #: Hub tags added to the run's own (``sft-forge``, the template, the method).
    tags: list[str] = field(default_factory=list)
    #: Further front-matter keys (``quantized_by`` ...).
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Markdown: how to use these files once downloaded from the repo.
    usage: str = ""


@dataclass
class EvalModel:
    """A model an exporter wrote into a run that ``sft eval`` can score (see :meth:`Exporter.eval_models`).

    ``score(tasks, limit)`` runs lm-eval on ``tasks`` (names or YAML paths, already checked) with
    the chat template applied and returns task -> metric -> value, as
    :func:`sft.engine.evaluate.run_lm_eval` does; it raises :class:`~sft.core.errors.SftError`
    when the model cannot be scored.
    """

    label: str
    source: str
    score: Callable[[list[str], "int | None"], dict[str, dict[str, Any]]] = field(repr=False, compare=False)


class ExportContext(Protocol):
    """What every exporter and publisher gets for one finished run (the engine builds it: :mod:`sft.engine.export`).

    Everything heavy (the tokenizer, the base model's config) is built on first use and kept
    for the rest of the export run; :meth:`shared` keeps what several exporters share (a
    merged model) the same way.
    """

    #: The run directory (``config.yaml``, ``adapter/``, ``exports/``, ``summary.json``).
    run_dir: "RunDir"
    #: The resolved config: the run's, plus any ``sft export`` / ``sft publish`` overrides.
    config: Any
    #: The plugin manager the config was validated with (``pm.get("exporter", name)``).
    pm: Any
    #: The run's chat template, configured with its ``template.<name>`` options.
    template: "ChatTemplate"
    #: True in the preflight before training: the adapter does not exist yet.
    before_training: bool

    @property
    def name(self) -> str:
        """A file-name stem for exports: the run name, else the run folder's name."""

    @property
    def env(self) -> "Environment":
        """The hardware and libraries of this process."""

    @property
    def adapter_dir(self) -> Path:
        """``<run>/adapter``: the LoRA adapter (or the whole model of a full fine-tune) and the tokenizer."""

    @property
    def tmp_dir(self) -> Path:
        """Scratch space inside the run (same filesystem, so renames are atomic), removed after the export run."""

    @property
    def verifying(self) -> bool:
        """Whether exports are checked (``export.verify`` true or null)."""

    @property
    def is_full_model(self) -> bool:
        """True when the run trained every weight (no LoRA adapter)."""

    @property
    def trained_in_4bit(self) -> bool:
        """Whether training loaded the base quantized to 4 bits."""

    @property
    def base_model(self) -> str:
        """Local folder or Hub id of the base model."""

    @property
    def tokenizer_dir(self) -> Path:
        """Where the run's tokenizer lives (the adapter folder; the base model's before training)."""

    @property
    def tokenizer(self) -> Any:
        """The run's tokenizer, with the template's Jinja as its ``chat_template``."""

    @property
    def eot_token(self) -> str:
        """The template's end-of-turn token (its first stop token)."""

    def shared(self, key: str, build: Callable[[], T]) -> T:
        """``build()`` once per export run, then the same object."""

    def output_dir(self, name: str) -> Path:
        """``<run>/exports/<name>`` (created). Exporters write only here."""

    def base_config(self) -> dict[str, Any]:
        """The base model's ``config.json`` as a dict."""

    def base_local_dir(self) -> Path | None:
        """The folder holding the base weights, or None when they are not on disk."""

    def parameter_count(self) -> int:
        """Parameters of the base model, from its weight headers (nothing is loaded)."""

    def tokenizer_problems(self) -> list[str]:
        """Missing tokenizer files (checked before any work)."""

    def adapter_problems(self) -> list[str]:
        """Missing adapter files (none are expected before training)."""

    def verify_prompt(self, text: str | None = None) -> str:
        """The template-rendered generation prompt exports are checked with."""

    def stop_token_ids(self) -> set[int]:
        """Ids of the template's stop tokens and the tokenizer's EOS."""

    def save_tokenizer(self, path: str | Path) -> None:
        """Save the run's tokenizer (template chat_template included) into ``path``."""

    def disk_problem(self, expected_bytes: int, what: str) -> str | None:
        """Reserve ``expected_bytes`` on the run's filesystem; a message when they will not fit."""


class Exporter(Plugin):
    """Writes a finished run out in one format. The adapter is always on disk before any exporter runs."""

    def eval_models(self, context: "ExportContext") -> list[EvalModel]:
        """The models this exporter wrote into ``context``'s run that ``sft eval`` scores and compares
        with the run's own model (default: none). Called only when ``exports/<name>/`` exists."""
        return []

    #: With ``publish.hub.repo_id`` set to R, this exporter's files go to the Hub repo ``R + hub_suffix``
    #: (``""``: R itself). None means ``"-<name>"``.
    hub_suffix: ClassVar[str | None] = None

    def hub_card(self, context: "ExportContext", result: ExportResult, repo_id: str, user: str) -> HubCard:
        """What the model card of ``repo_id`` says about ``result`` (pushed there by Hub user ``user``)."""
        return HubCard()

    def preflight(self, context: "ExportContext", options: Any = None) -> list[str]:
        """Problems that would make :meth:`export` fail (disk, architecture, files), found before any work."""
        return []

    @abstractmethod
    def export(self, context: "ExportContext", options: Any = None) -> ExportResult:
        """Write the export under ``context.output_dir(self.name)`` and return what was written."""

    def answer(self, paths: Sequence[str], messages: Sequence[Mapping[str, str]], settings: Mapping[str, Any]) -> str:
        """Optional: the next assistant turn for ``messages`` (``{"role", "content"}`` dicts, the
        last one the user's) from this exporter's files ``paths``, so ``sft chat RUN --export NAME``
        talks to what will be shipped. ``settings``: ``max_new_tokens``, ``temperature``, ``top_p``,
        ``seed``. The default says the exporter cannot."""
        raise NotImplementedError(f"exporter '{self.name}' writes nothing one can chat with")


class TrainingBackend(Plugin):
    """Loads a model and tokenizer for training and attaches LoRA, on one kind of hardware.

    ``model.backend: auto`` picks the available backend with the highest ``priority``.
    """

    priority: ClassVar[int] = 0
    #: True when the trainer should compute the loss only at trained positions (the output
    #: head then projects a few hundred hidden states, not every position). False for a
    #: backend whose model computes its own (fused) loss inside ``forward``.
    trained_positions_loss: ClassVar[bool] = False
    #: True when the exporters must run in a fresh process after training, because loading
    #: this backend patched libraries process-wide in a way plain transformers models break on.
    exports_in_subprocess: ClassVar[bool] = False
    #: The ``distributed.strategy`` values this backend trains under with several processes.
    #: DDP replicates whatever model the backend loaded, so every backend has it by default;
    #: FSDP2 shards the model, which the backend must allow (no device_map, one dtype per shard).
    distributed_strategies: ClassVar[tuple[str, ...]] = ("ddp",)

    def distributed_reason(self, config: Any, strategy: str) -> str | None:
        """Why this backend cannot train ``config`` with ``strategy`` on several processes, or None.

        Asked before anything loads (by ``sft run --nproc``'s launcher and by every rank). The
        default checks :attr:`distributed_strategies`; override it for rules that depend on the
        config (say, a quantization setting a strategy cannot shard).
        """
        if strategy not in self.distributed_strategies:
            return (f"the '{self.name}' backend cannot train with distributed.strategy={strategy} "
                    f"(it supports: {', '.join(self.distributed_strategies) or 'one process only'})")
        return None

    def config_problems(self, config: Any) -> list[tuple[str, str]]:
        """``(key, why)`` for each setting of ``config`` this backend cannot train (say, a LoRA
        initialisation its ``get_peft_model`` refuses), asked by ``sft validate`` and before a run
        loads anything. Default: none."""
        return []

    def config_notes(self, config: Any) -> list[str]:
        """One line for each setting this backend trains, but differently than users may expect
        (slower, another path); shown by ``sft validate`` and the run. Default: none."""
        return []

    def prepare_environment(self) -> None:
        """Called once before the data stage and before TRL is imported (e.g. to import a
        library whose patches must apply first). The default does nothing."""

    @abstractmethod
    def load(self, config: Any) -> tuple[Any, Any]:
        """Load ``(model, tokenizer)`` as ``config.model`` asks (dtype, 4-bit, max_seq_length)."""

    @abstractmethod
    def prepare_for_training(self, model: Any, config: Any, new_token_rows: Sequence[int] = ()) -> Any:
        """Attach LoRA (or prepare full fine-tuning) as ``config.lora``/``config.model.method`` ask; return the model.

        ``new_token_rows`` are the embedding rows the core added after :meth:`load` (tokens
        the chat template needs and the base vocabulary lacks, e.g. its end-of-turn token):
        they start untrained, so the backend must make them trainable.
        """

    def continue_training(self, model: Any, config: Any, adapter_dir: Path) -> Any:
        """Put a finished run's LoRA adapter (``model.from_run``; ``adapter_dir`` holds it) on
        ``model`` (as :meth:`load` returned it, its embeddings sized for that run's tokenizer),
        trainable, and return the model. The default says this backend cannot."""
        raise SftError(f"the '{self.name}' backend cannot continue a finished run's adapter (model.from_run); "
                       f"choose another model.backend")


class Publisher(Plugin):
    """Sends a run's finished exports somewhere: the Hugging Face Hub, a folder, a bucket.

    The engine reaches every publisher in ``publish.enabled`` the same way: :meth:`preflight`
    before training (and before ``--nproc`` workers start), :meth:`start` once per export run
    or ``sft publish``, then :meth:`publish` for each export as soon as it is written. What
    each call returns or raises is recorded in ``summary.json`` (``publish.<name>``), so a
    failure loses nothing: the exports stay on disk and ``sft publish RUN --to NAME`` retries.
    Instances are shared, so :meth:`start` resets any state of an earlier run.
    """

    #: An option whose value, when set (not null), lists this publisher in ``publish.enabled``
    #: by itself (the hub's ``repo_id``: ``--push-to-hub R`` alone pushes). None: only the list does.
    enabled_by: ClassVar[str | None] = None
    #: A config section this publisher's options were read from before publishers were a
    #: kind (the hub's ``export.push``): its keys are read as ``publish.<name>.*``, with a notice.
    moved_from: ClassVar[str | None] = None
    #: Options a run folder's saved ``config.yaml`` cannot choose by itself, as option -> (the
    #: safe value, the flag that confirms another): when ``sft export`` or ``sft publish`` reads a
    #: run's config, each keeps the safe value (with a notice) unless the command line sets it. The
    #: hub's ``private`` and ``force``: a run someone sent you cannot make your repos public.
    confirmed_options: ClassVar[Mapping[str, tuple[Any, str]]] = {}

    def preflight(self, config: Any, exporters: Sequence[Exporter], options: Any = None) -> list[str]:
        """Problems that would make publishing the exports of ``exporters`` fail (a missing or
        refused token, a destination that may not be written), found before training starts and
        before the run directory exists; ``config`` is the validated run config. Default: none."""
        return []

    def start(self, context: ExportContext, options: Any = None) -> str:
        """Get ready to publish ``context``'s run (check credentials) and return where its exports
        go (a repo, a folder), recorded in ``summary.json``. Raise
        :class:`~sft.core.errors.SftError` when nothing can be published: the exports are still
        written, and the failure is recorded for ``sft publish`` to retry."""
        return self.name

    @abstractmethod
    def publish(self, context: ExportContext, exporter: Exporter, result: ExportResult,
                options: Any = None) -> dict[str, Any]:
        """Publish one finished export and return its record for ``summary.json`` (JSON values;
        ``ok``, and ``error`` when it failed, are added by the engine when missing). Raising
        :class:`~sft.core.errors.SftError` records a failure; the other exports still go."""

    def error_text(self, exc: BaseException) -> str:
        """The one line recorded and shown for an exception :meth:`start` or :meth:`publish`
        raised; override it to scrub secrets from library messages. Default: the message."""
        return str(exc) if isinstance(exc, SftError) else f"{type(exc).__name__}: {exc}"


class TrainerSetup(Protocol):
    """What an objective gets to build its trainer (the engine builds it: :mod:`sft.engine.trainer`)."""

    #: The validated run config.
    config: Any
    #: The model, ready to train: LoRA attached (or the finished run's adapter loaded, with
    #: ``model.from_run``), or every weight trainable for a full fine-tune.
    model: Any
    #: The run's tokenizer, fitted to its template.
    tokenizer: Any
    #: The prepared rows (:class:`sft.engine.data.PreparedData`): ``train``/``eval`` datasets whose
    #: columns follow the objective's :attr:`Objective.row_kind` (see docs/preference.md).
    data: Any
    #: The hardware and libraries of this process.
    env: "Environment"
    #: Where the trainer writes checkpoints.
    output_dir: Path
    #: The callbacks the engine needs (metrics, stopping); pass them to the trainer.
    callbacks: list[Any]
    #: The backend that loaded the model.
    backend: "TrainingBackend"

    def arguments(self, config_class: type, **values: Any) -> Any:
        """``config_class`` (a TRL config such as ``DPOConfig``) filled from ``training.*`` as
        ``sft`` sets them for every objective (optimizer, precision, logging, checkpoints, seed),
        plus ``values``."""

    def trainer_class(self, base: type) -> type:
        """``base`` (a TRL trainer class) with the engine's guards: atomic checkpoints, a NaN/inf
        loss stopping the run, counted tokens and checkpoints a resume can trust."""


class Objective(Plugin):
    """What the trainer optimises: supervised fine-tuning (``sft``), or a preference objective
    (``dpo``, ``orpo``, ``kto``, ``simpo``) on rows of the kind it declares.

    ``objective.name`` picks one; its options live at ``objective.<name>``. The engine prepares
    the model and the rows (of :attr:`row_kind`) and calls :meth:`build_trainer`; everything
    after training (the adapter, exports, publishing, eval) is the same for every objective.
    """

    #: The rows it trains on, one of :data:`ROW_KINDS`.
    row_kind: ClassVar[str] = "conversation"
    #: True when its loss compares the policy with a frozen reference model (DPO, KTO): the
    #: finished run a run continues (``model.from_run``), else the base model.
    uses_reference: ClassVar[bool] = False
    #: What its trainer logs besides the loss, learning rate and grad norm, as the trainer names
    #: the keys (``rewards/chosen``, ...); they reach every logger, ``metrics.jsonl`` and ``summary.json``.
    metrics: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def build_trainer(self, setup: TrainerSetup, options: Any = None) -> Any:
        """A ``transformers.Trainer`` (usually a TRL trainer through ``setup.trainer_class``) for ``setup``."""


#: The plugin kinds: kind name -> (hook name, interface, config section of its options).
KINDS: dict[str, tuple[str, type, str]] = {
    "dataset_format": ("register_dataset_formats", DatasetFormat, "data"),
    "chat_template": ("register_chat_templates", ChatTemplate, "template"),
    "logger": ("register_loggers", Logger, "loggers"),
    "exporter": ("register_exporters", Exporter, "export"),
    "backend": ("register_backends", TrainingBackend, "model"),
    "publisher": ("register_publishers", Publisher, "publish"),
    "objective": ("register_objectives", Objective, "objective"),
}
