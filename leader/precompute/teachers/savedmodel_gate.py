"""A gate in front of `tf.saved_model.load`: list a SavedModel's ops and refuse the dangerous ones.

    findings = audit_savedmodel("weights/cxr_foundation_v2")      # before anything is loaded
    check_savedmodel("weights/cxr_foundation_v2", trust_model=False)   # LeaderError naming the ops

A SavedModel is a program. Loading one runs its restore function and its init op, and calling its
serving signature runs whatever ops the graph holds; TensorFlow has ops that read, write and list
files, run Python, or talk to other machines. `torch.load(weights_only=True)` guards the PyTorch
teachers; this is the same guard for the TensorFlow one.

The gate reads `saved_model.pb` (or `.pbtxt`) as a protobuf, so nothing of the model runs: it
walks the top-level graph of every meta graph and every function of its library. The library holds
every function the model can call, nested ones included (a `tf.map_fn` or while-loop body, the
branches of a `tf.cond`, functions called by other functions), so nothing executable is missed.
Each op found on the deny list below is reported with the function it is in and the signatures
that reach that function.

Save and restore ops are how every SavedModel loads its variables, so they are allowed in the
functions the model's saver names (its `__inference__traced_save/restore` functions, or the
`save/` nodes of a TF1 graph) and refused anywhere else.

What this does not cover: ops a native library registers under a name of its own (TensorFlow
cannot run those unless that library is loaded, which leader never does), native file-system
plugins TensorFlow itself loads, and a model directory changed between this check and the load.
Kernels' own bugs (a crafted tensor that crashes an op) are outside any op list.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from leader.errors import LeaderError

# Ops that read, write, list or map files named at run time. The model would open paths on this
# machine: the shards, other users' data, ~/.ssh. Summary and debug writers write event files
# (PrintV2 and the Debug ops can write to a file:// URL); proto codecs can load a descriptor file.
FILE_SYSTEM = frozenset({
    "ReadFile", "WriteFile", "MatchingFiles", "MatchingFilesDataset", "ExperimentalMatchingFilesDataset",
    "ImmutableConst", "FileSystemSetConfiguration",
    "WholeFileReader", "WholeFileReaderV2", "TextLineReader", "TextLineReaderV2", "FixedLengthRecordReader",
    "FixedLengthRecordReaderV2", "TFRecordReader", "TFRecordReaderV2", "LMDBReader",
    "ReaderRead", "ReaderReadV2", "ReaderReadUpTo", "ReaderReadUpToV2",
    "TFRecordDataset", "TFRecordDatasetV2", "TextLineDataset", "FixedLengthRecordDataset",
    "FixedLengthRecordDatasetV2", "LMDBDataset", "ExperimentalLMDBDataset", "CSVDataset", "CSVDatasetV2",
    "ExperimentalCSVDataset", "SqlDataset", "ExperimentalSqlDataset", "LoadDataset", "SaveDataset",
    "SaveDatasetV2", "DatasetToTFRecord", "ExperimentalDatasetToTFRecord", "SnapshotDataset",
    "SnapshotDatasetV2", "SnapshotDatasetReader", "SnapshotNestedDatasetReader", "SnapshotChunkDataset",
    "ListSnapshotChunksDataset", "CacheDataset", "CacheDatasetV2",
    "InitializeTableFromTextFile", "InitializeTableFromTextFileV2", "GenerateVocabRemapping",
    "LoadAndRemapMatrix",
    "SummaryWriter", "CreateSummaryFileWriter", "CreateSummaryDbWriter", "WriteSummary", "WriteScalarSummary",
    "WriteHistogramSummary", "WriteImageSummary", "WriteAudioSummary", "WriteGraphSummary",
    "WriteRawProtoSummary", "ImportEvent", "FlushSummaryWriter", "CloseSummaryWriter",
    "StatsAggregatorSetSummaryWriter",
    "DebugIdentity", "DebugIdentityV2", "DebugIdentityV3", "DebugNanCount", "DebugNumericSummary",
    "PrintV2", "DecodeProtoV2", "EncodeProto",
})

# Ops that call back into the Python interpreter of the process that runs the model.
PYTHON = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})

# TensorFlow has no op that starts a process; these reach other processes or machines (RPC, the
# tf.data service, distributed snapshots) or run a graph the scan cannot see (a dataset graph
# shipped as a string and deserialised at run time).
PROCESS_AND_NETWORK = frozenset({
    "RpcServer", "RpcServerStart", "RpcServerRegister", "RpcClient", "RpcCall", "RpcCheckStatus",
    "RpcGetValue", "DeleteRpcFutureResource",
    "DataServiceDataset", "DataServiceDatasetV2", "DataServiceDatasetV3", "DataServiceDatasetV4",
    "RegisterDataset", "RegisterDatasetV2", "DistributedSave", "DatasetFromGraph",
})

# Checkpoint reading and writing: file access by design, needed by the saver that restores the
# variables at load time, and by nothing else in an embedding model.
CHECKPOINT = frozenset({"Save", "SaveV2", "SaveSlices", "Restore", "RestoreV2", "RestoreSlice", "MergeV2Checkpoints"})

CATEGORIES = {"file system": FILE_SYSTEM, "Python": PYTHON, "process or network": PROCESS_AND_NETWORK,
              "checkpoint outside the saver": CHECKPOINT}


def category_of(op: str) -> str | None:
    for name, ops in CATEGORIES.items():
        if op in ops:
            return name
    return None


@dataclass(frozen=True)
class Finding:
    """One denied op: which, why, where it sits and which signatures run it."""

    op: str
    category: str
    where: str                     # "function map_while_body_108" or "the top-level graph"
    reached_from: tuple[str, ...]  # signature names (and "the saver") whose graph calls it

    def describe(self) -> str:
        via = f" (reached from {', '.join(self.reached_from)})" if self.reached_from else ""
        return f"{self.op} [{self.category}] in {self.where}{via}"


def read_savedmodel_proto(model_dir: str | Path) -> Any:
    """The SavedModel protobuf of a directory, parsed without loading or running anything."""
    from google.protobuf import message, text_format
    from tensorflow.core.protobuf import saved_model_pb2

    model_dir = Path(model_dir)
    proto = saved_model_pb2.SavedModel()
    binary, text = model_dir / "saved_model.pb", model_dir / "saved_model.pbtxt"
    try:
        if binary.is_file():
            proto.ParseFromString(binary.read_bytes())
        elif text.is_file():
            text_format.Parse(text.read_text(), proto)
        else:
            raise LeaderError(f"SavedModel {str(model_dir)!r} has no saved_model.pb: it is not a TensorFlow SavedModel")
    except (message.DecodeError, text_format.ParseError, UnicodeDecodeError) as e:
        raise LeaderError(f"SavedModel {str(model_dir)!r}: saved_model.pb does not parse ({e}); the file is damaged "
                          "or not a SavedModel") from None
    if not proto.meta_graphs:
        raise LeaderError(f"SavedModel {str(model_dir)!r} holds no meta graph")
    return proto


def audit_savedmodel(model_dir: str | Path) -> list[Finding]:
    """Every denied op of every meta graph, function by function (empty: nothing to refuse)."""
    proto = read_savedmodel_proto(model_dir)
    findings: dict[tuple[str, str], set[str]] = defaultdict(set)
    for meta_graph in proto.meta_graphs:
        for (op, where), reached in _meta_graph_findings(meta_graph).items():
            findings[(op, where)] |= reached
    return [Finding(op, category_of(op), where, tuple(sorted(reached)))
            for (op, where), reached in sorted(findings.items())]


def check_savedmodel(model_dir: str | Path, *, trust_model: bool = False, kind: str = "cxr-foundation") -> list[Finding]:
    """Refuse a SavedModel with denied ops in one line naming them, unless the user trusts it."""
    findings = audit_savedmodel(model_dir)
    if findings and not trust_model:
        categories = sorted({f.category for f in findings})
        raise LeaderError(
            f"teacher {kind!r}: SavedModel {str(model_dir)!r} was not loaded: its graph holds "
            f"{', '.join(categories)} ops: {'; '.join(f.describe() for f in findings[:8])}"
            f"{f'; and {len(findings) - 8} more' if len(findings) > 8 else ''}. "
            "Load it only if you trust where it came from, with --trust-model")
    return findings


# ---------------------------------------------------------------------------------------------
# Walking the graph


def _meta_graph_findings(meta_graph: Any) -> dict[tuple[str, str], set[str]]:
    graph = meta_graph.graph_def
    functions = {f.signature.name: f for f in graph.library.function}
    top_nodes = {node.name: node for node in graph.node}
    reached_by: dict[str, set[str]] = defaultdict(set)      # function name -> who reaches it
    top_reached_by: dict[str, set[str]] = defaultdict(set)  # top-level node name -> who reaches it

    entry_points = {f"signature {name!r}": [t.name for t in [*sig.inputs.values(), *sig.outputs.values()]]
                    for name, sig in meta_graph.signature_def.items()}
    saver = meta_graph.saver_def
    entry_points["the saver"] = [t for t in (saver.filename_tensor_name, saver.save_tensor_name,
                                             saver.restore_op_name) if t]
    for who, tensors in entry_points.items():
        for node_name in _ancestors(top_nodes, [_node_name(t) for t in tensors]):
            top_reached_by[node_name].add(who)
            for name in _closure(functions, _called_functions(top_nodes[node_name], functions)):
                reached_by[name].add(who)

    found: dict[tuple[str, str], set[str]] = defaultdict(set)

    def visit(nodes: Iterable[Any], where: str, reached: set[str]) -> None:
        for node in nodes:
            category = category_of(node.op)
            if category is None:
                continue
            if category == "checkpoint outside the saver" and reached == {"the saver"}:
                continue      # the saver's own restore/save: how the variables load
            found[(node.op, where)] |= reached

    for node in graph.node:
        visit([node], "the top-level graph", top_reached_by.get(node.name, set()))
    for name, function in functions.items():
        visit(function.node_def, f"function {name}", reached_by.get(name, set()))
    return found


def _node_name(tensor: str) -> str:
    """'^name', 'name:0' and 'name' all name the node 'name'."""
    return tensor.lstrip("^").split(":")[0]


def _ancestors(nodes: dict[str, Any], start: list[str]) -> set[str]:
    seen: set[str] = set()
    stack = [n for n in start if n in nodes]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        stack += [i for i in (_node_name(x) for x in nodes[name].input) if i in nodes and i not in seen]
    return seen


def _called_functions(node: Any, functions: dict[str, Any]) -> set[str]:
    """Library functions a node calls: through func-valued attributes (`f` of a PartitionedCall,
    `body`/`cond` of a While, the branches of an If or Case), or by naming one as its op."""
    called = {node.op} & functions.keys()
    for value in node.attr.values():
        if value.HasField("func"):
            called.add(value.func.name)
        if value.HasField("list"):
            called |= {f.name for f in value.list.func}
    return called & functions.keys()


def _closure(functions: dict[str, Any], start: Iterable[str]) -> set[str]:
    """The functions `start` calls, directly or through other functions, themselves included."""
    seen: set[str] = set()
    stack = list(start)
    while stack:
        name = stack.pop()
        if name in seen or name not in functions:
            continue
        seen.add(name)
        for node in functions[name].node_def:
            stack += list(_called_functions(node, functions) - seen)
    return seen
