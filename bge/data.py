"""Reading users' files: the FlagEmbedding training JSONL, BEIR folders and STS TSV files.

Every reader validates as it goes and collects every bad line (file:line: field: what is wrong) instead of
stopping at the first; `DataError` carries the short report the CLIs print. The training format is
    {"query": str, "pos": [str, ...], "neg": [str, ...], "prompt"?: str, "pos_scores"?: [float], "neg_scores"?: [float],
     "qid"?: str}
and rows of {"anchor", "positive", "negative"} are read as query/pos/neg. `qid` names the query (bge.mine writes the
BEIR query id there, so a mined file splits exactly as its BEIR folder does); without it a query is its line number.
Besides retrieval lines a training file may hold STS pairs {"sentence1", "sentence2", "score"} and classification
rows {"text", "label"}, mixed freely (`load_training_file`; a line's task comes from its `type` field or its fields).
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from bge.errors import UserError

REPORT_LINES = 12  # bad lines shown in a report; the rest are counted


class DataError(UserError):
    """Bad lines in an input file: `problems` holds one 'file:line: what is wrong' string per bad line."""

    def __init__(self, path: Path | str, problems: list[str], hint: str = ""):
        self.problems = problems
        hint = f" ({hint})" if hint else ""
        if len(problems) == 1:
            message = problems[0] + hint
        else:
            more = [f"... and {len(problems) - REPORT_LINES} more"] if len(problems) > REPORT_LINES else []
            message = "\n  ".join([f"{path}: {len(problems)} bad lines{hint}", *problems[:REPORT_LINES], *more])
        super().__init__(message)


@dataclass
class Example:
    """One training query with its positives and (maybe) hard negatives."""

    query: str
    pos: list[str]
    neg: list[str] = field(default_factory=list)
    prompt: str | None = None  # per-line query instruction, overriding the model's
    pos_scores: list[float] | None = None  # teacher scores (FlagEmbedding's distillation format)
    neg_scores: list[float] | None = None
    qid: str = ""  # BEIR query id, or the line number in a JSONL file
    line: int = 0
    kind: str = ""  # FlagEmbedding's `type` (only_1neg, symmetric_sts, ...), which changes how the line is batched
    own_id: bool = False  # the qid was given (a BEIR id, bge.mine's output): a query of its own, never merged
    file: int | None = None  # the --data source it came from, in a run of several (its qid then starts "<file>:")


@dataclass
class RetrievalData:
    """An evaluation set: queries, a corpus and graded relevance judgements (BEIR's shape)."""

    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]
    prompts: dict[str, str] = field(default_factory=dict)  # per-query instruction, when the file gave one
    name: str = ""
    merged: dict[str, list[str]] = field(default_factory=dict)  # qid -> the later lines' qids folded into it

    @property
    def n_merged(self) -> int:
        """Training lines folded into an earlier line's query (they repeat its text)."""
        return sum(len(v) for v in self.merged.values())

    def merged_note(self, label: str) -> str:
        """What retrieval_from_examples merged, in one line."""
        return (f"{label}: {self.n_merged} line(s) repeat an earlier line's query; each such query is scored once, with "
                f"the positives of all its lines ({len(self.queries)} queries)")

    def fingerprint(self) -> str:
        """A hash of the content (queries, corpus, qrels), for results files and caches."""
        h = hashlib.blake2b(digest_size=16)
        for part in (self.queries, self.corpus, self.qrels, self.prompts):
            h.update(json.dumps(part, sort_keys=True, ensure_ascii=False).encode())
        return h.hexdigest()

    def subset(self, qids: list[str]) -> "RetrievalData":
        """The same corpus, with only these queries."""
        keep = set(qids)
        return RetrievalData({q: t for q, t in self.queries.items() if q in keep}, self.corpus,
                             {q: r for q, r in self.qrels.items() if q in keep},
                             {q: p for q, p in self.prompts.items() if q in keep}, self.name,
                             {q: m for q, m in self.merged.items() if q in keep})


# ---- line-level reading ------------------------------------------------------------------------------
def read_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text) for each non-blank line; text is None for a line that is not valid UTF-8.
    A UTF-8 BOM and CRLF line ends are accepted."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    for n, line in enumerate(raw.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        try:
            yield n, line.decode("utf-8")
        except UnicodeDecodeError:
            yield n, None


def read_json_objects(path: Path, problems: list[str]) -> Iterator[tuple[int, dict]]:
    """Each line's JSON object; bad lines go to `problems` instead."""
    for n, text in read_lines(path):
        where = f"{path}:{n}"
        if text is None:
            problems.append(f"{where}: not valid UTF-8")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
            continue
        yield n, obj


class _Fields:
    """Typed access to one JSON object's fields that records what is wrong instead of raising."""

    def __init__(self, obj: dict, where: str, problems: list[str]):
        self.obj, self.where, self.problems, self.ok = obj, where, problems, True

    def bad(self, msg: str) -> None:
        self.problems.append(f"{self.where}: {msg}")
        self.ok = False

    def text(self, name: str, required: bool = True) -> str | None:
        if name not in self.obj or self.obj[name] is None:
            if required:
                self.bad(f"missing field '{name}'")
            return None
        v = self.obj[name]
        if not isinstance(v, str):
            return self.bad(f"field '{name}' must be a string, got {type(v).__name__}")
        if not v.strip():
            return self.bad(f"field '{name}' is empty")
        return v

    def texts(self, name: str, required: bool = True) -> list[str]:
        """A list of non-empty strings; a lone string is wrapped (never split into characters)."""
        if name not in self.obj or self.obj[name] is None:
            if required:
                self.bad(f"missing field '{name}'")
            return []
        v = self.obj[name]
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list):
            self.bad(f"field '{name}' must be a list of strings, got {type(v).__name__}")
            return []
        if required and not v:
            self.bad(f"field '{name}' is empty")
        for i, t in enumerate(v):
            if not isinstance(t, str):
                self.bad(f"field '{name}'[{i}] must be a string, got {type(t).__name__}")
            elif not t.strip():
                self.bad(f"field '{name}'[{i}] is empty")
        return v if self.ok else []

    def scores(self, name: str, n: int) -> list[float] | None:
        if self.obj.get(name) is None:
            return None
        v = self.obj[name]
        if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            return self.bad(f"field '{name}' must be a list of numbers")
        if len(v) != n:
            return self.bad(f"field '{name}' has {len(v)} scores for {n} passages")
        return [float(x) for x in v]


# ---- training files ----------------------------------------------------------------------------------
ALIASES = {"anchor": "query", "positive": "pos", "negative": "neg"}  # sentence-transformers' triplet columns


def parse_example(obj: dict, where: str, problems: list[str]) -> Example | None:
    """One training line, or None (with its problems recorded)."""
    if "query" not in obj and "anchor" in obj:
        obj = {ALIASES.get(k, k): v for k, v in obj.items()}
    f = _Fields(obj, where, problems)
    query = f.text("query")
    pos = f.texts("pos")
    neg = f.texts("neg", required=False)
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        f.bad(f"field 'prompt' must be a string, got {type(prompt).__name__}")
    pos_scores = f.scores("pos_scores", len(pos)) if pos else None
    neg_scores = f.scores("neg_scores", len(neg))
    qid = obj.get("qid")
    if qid is not None and (isinstance(qid, bool) or not isinstance(qid, (str, int)) or not str(qid).strip()):
        f.bad(f"field 'qid' must be a non-empty string or an integer, got {qid!r}")
    if not f.ok:
        return None
    kind = obj.get("type") if obj.get("type") in FLAGEMBEDDING_TYPES else ""
    return Example(query, pos, neg, prompt, pos_scores, neg_scores, qid="" if qid is None else str(qid), kind=kind,
                   own_id=qid is not None)


def claim_qid(ex: Example, first_line: dict[str, int], where: str, problems: list[str]) -> bool:
    """Give a training line its query id (its own `qid`, as bge.mine writes the BEIR id; else its line number) and
    check that no earlier line took it: the split and the evaluation key queries by id."""
    ex.qid = ex.qid or str(ex.line)
    if first_line.setdefault(ex.qid, ex.line) != ex.line:
        problems.append(f"{where}: qid {ex.qid!r} is already used on line {first_line[ex.qid]}")
        return False
    return True


def load_examples(path: str | Path, skip_bad_lines: bool = False) -> tuple[list[Example], list[str]]:
    """The query/pos/neg lines of a JSONL file (read by load_training_file as a retrieval file) and the problems of the
    lines skipped, for the tools that need retrieval lines only (mining, scoring, retrieval evaluation)."""
    data, problems = load_training_file(path, "retrieval", skip_bad_lines)
    if data.sts or data.classification:
        first = (data.sts or data.classification)[0]
        raise UserError(f"{path}:{first.line}: this needs query/pos lines, and this line is an "
                        f"{'STS' if data.sts else 'classification'} line (its 'type')")
    return data.retrieval, problems


def examples_from_beir(data: RetrievalData) -> list[Example]:
    """Training examples from a BEIR split: each query's relevant documents are its positives, no negatives."""
    out = []
    for qid, rels in data.qrels.items():
        pos = [data.corpus[d] for d, g in rels.items() if g > 0]
        if pos:
            out.append(Example(data.queries[qid], pos, [], data.prompts.get(qid), qid=qid, own_id=True))
    return out


def normalise(text: str) -> str:
    """Text as compared for identity: case-folded, whitespace collapsed."""
    return " ".join(text.split()).casefold()


def retrieval_from_examples(examples: list[Example], name: str = "", corpus: dict[str, str] | None = None) -> RetrievalData:
    """An evaluation set from training lines: each query's positives are its relevant documents; the corpus
    is every positive and negative of the lines, deduplicated by text. With `corpus` (id -> text) the corpus is
    that one, in its order and with its ids, plus any passage of the lines it lacks (ids d0, d1, ...).
    Lines without a qid of their own that repeat a query (normalised text and instruction) are one query holding all
    their positives (a FlagEmbedding file often has one line per query-positive pair): scored apart, each line's query
    would count the other lines' positives as non-relevant. Lines with their own qid (BEIR ids, as bge.mine writes
    them) stay separate queries, as the benchmark scores them. `merged` records which lines were folded into which."""
    corpus = corpus or {}
    doc_ids: dict[str, str] = {}
    for d, text in corpus.items():
        doc_ids.setdefault(text, d)  # a text held under two ids is judged under the first
    n_added = 0
    queries, qrels, prompts, merged = {}, {}, {}, {}
    first: dict[tuple[str, str | None], str] = {}  # (normalised query, instruction) -> the qid that holds it
    for i, ex in enumerate(examples):
        for text in ex.pos + ex.neg:
            if text not in doc_ids:
                while f"d{n_added}" in corpus:  # never reuse an id of the given corpus
                    n_added += 1
                doc_ids[text] = f"d{n_added}"
                n_added += 1
        qid = ex.qid or f"q{i}"
        holder = qid if ex.own_id else first.setdefault((normalise(ex.query), ex.prompt), qid)
        if holder != qid:
            merged.setdefault(holder, []).append(qid)
            qrels[holder].update({doc_ids[t]: 1 for t in ex.pos})
            continue
        queries[qid] = ex.query
        qrels[qid] = {doc_ids[t]: 1 for t in ex.pos}
        if ex.prompt is not None:
            prompts[qid] = ex.prompt
    extra = {d: t for t, d in doc_ids.items() if d not in corpus}
    return RetrievalData(queries, {**corpus, **extra}, qrels, prompts, name, merged)


# ---- BEIR folders ------------------------------------------------------------------------------------
def load_beir(folder: str | Path, split: str = "test", use_title: bool = True) -> RetrievalData:
    """corpus.jsonl {_id, title, text}, queries.jsonl {_id, text}, qrels/<split>.tsv (query-id, corpus-id, score).
    Title and text are joined as BEIR does for BERT models: (title + ' ' + text).strip()."""
    folder = Path(folder)
    for need in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (folder / need).exists():
            raise UserError(f"{folder}: not a BEIR folder with split {split!r} (no {need})")
    problems: list[str] = []
    corpus = _read_corpus(folder / "corpus.jsonl", use_title, problems)
    if not corpus and not problems:  # before the qrels, whose every line would otherwise name a missing document
        raise UserError(f"{folder / 'corpus.jsonl'}: the corpus is empty")
    queries = {}
    for n, obj in read_json_objects(folder / "queries.jsonl", problems):
        f = _Fields(obj, f"{folder / 'queries.jsonl'}:{n}", problems)
        _id, text = _beir_id(f), f.text("text")
        if f.ok:
            queries[_id] = text
    if problems:  # a bad corpus or query line would make every qrels line naming it look bad too
        raise DataError(folder, problems)
    qrels: dict[str, dict[str, int]] = {}
    path = folder / "qrels" / f"{split}.tsv"
    for n, text in read_lines(path):
        cols = text.split("\t") if text is not None else []
        if n == 1 and cols and not cols[-1].strip().lstrip("-").isdigit():
            continue  # the header
        where = f"{path}:{n}"
        if len(cols) not in (3, 4):  # query-id, corpus-id, score (TREC's 4-column form has an iteration column)
            problems.append(f"{where}: expected 3 tab-separated columns (query-id, corpus-id, score)")
            continue
        q, d, score = cols[0], cols[-2], cols[-1].strip()
        if q not in queries:
            problems.append(f"{where}: query-id {q!r} is not in queries.jsonl")
        elif d not in corpus:
            problems.append(f"{where}: corpus-id {d!r} is not in corpus.jsonl")
        elif not score.lstrip("-").isdigit():
            problems.append(f"{where}: score {score!r} is not an integer")
        else:
            qrels.setdefault(q, {})[d] = int(score)
    if problems:
        raise DataError(folder, problems)
    if not qrels:
        raise UserError(f"{path}: no relevance judgements")
    return RetrievalData({q: queries[q] for q in qrels}, corpus, qrels, name=f"{folder.name}/{split}")


def _beir_id(f: _Fields, name: str = "_id") -> str | None:
    v = f.obj.get(name)
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return f.text(name)


def _read_corpus(path: Path, use_title: bool, problems: list[str], require_id: bool = True) -> dict[str, str]:
    """id -> passage of a JSONL of {_id (or id), title?, text}; without require_id a line lacking an id is named
    by its line number."""
    corpus: dict[str, str] = {}
    for n, obj in read_json_objects(path, problems):
        f = _Fields(obj, f"{path}:{n}", problems)
        key = next((k for k in ("_id", "id") if k in obj), "_id" if require_id else None)
        _id = _beir_id(f, key) if key else str(n)
        text, title = f.text("text"), obj.get("title") or ""
        if f.ok and _id in corpus:
            f.bad(f"id {_id!r} appears twice")
        if f.ok:
            corpus[_id] = (title + " " + text).strip() if use_title else text
    return corpus


def corpus_file(path: str | Path, what: str = "a corpus") -> Path:
    """The passage JSONL a --corpus-like argument names: a BEIR folder's corpus.jsonl, or the file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / "corpus.jsonl"
    if not path.exists():
        raise UserError(f"{path}: no such file ({what} is a BEIR folder or a JSONL of passages)")
    return path


def load_corpus(path: str | Path, use_title: bool = True) -> dict[str, str]:
    """A passage collection, id -> text: a BEIR folder's corpus.jsonl (the folder or the file), or any JSONL of
    {"_id" or "id"?, "title"?, "text"} lines (FlagEmbedding's candidate pool is {"text"} lines)."""
    path = corpus_file(path)
    problems: list[str] = []
    corpus = _read_corpus(path, use_title, problems, require_id=False)
    if problems:
        raise DataError(path, problems)
    if not corpus:
        raise UserError(f"{path}: the corpus is empty")
    return corpus


# ---- STS files ---------------------------------------------------------------------------------------
@dataclass
class STSData:
    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]
    name: str = ""
    lines: list[int] = field(default_factory=list)  # each pair's line in its file

    def fingerprint(self) -> str:
        """A hash of the content (pairs and scores), for results files."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([self.sentence1, self.sentence2, self.scores], ensure_ascii=False).encode())
        return h.hexdigest()


def load_sts(path: str | Path) -> STSData:
    """A TSV with a header naming score, sentence1 and sentence2 (in any order), or the same as JSONL."""
    path = Path(path)
    problems: list[str] = []
    s1, s2, gold, lines = [], [], [], []
    if path.suffix == ".jsonl":
        rows = ((n, obj) for n, obj in read_json_objects(path, problems))
    else:
        rows = _tsv_rows(path, problems)
    for n, row in rows:
        pair = parse_pair(row, f"{path}:{n}", problems)
        if pair is not None:
            s1.append(pair.sentence1), s2.append(pair.sentence2), gold.append(pair.score), lines.append(n)
    if problems:
        raise DataError(path, problems)
    if len(gold) < 2:
        raise UserError(f"{path}: an STS file needs at least 2 scored pairs")
    return STSData(s1, s2, gold, name=path.name, lines=lines)


def _tsv_rows(path: Path, problems: list[str]) -> Iterator[tuple[int, dict]]:
    header = None
    for n, text in read_lines(path):
        if text is None:
            problems.append(f"{path}:{n}: not valid UTF-8")
            continue
        cols = next(csv.reader([text], delimiter="\t", quoting=csv.QUOTE_NONE))
        if header is None:
            header = [c.strip().lower() for c in cols]
            missing = {"score", "sentence1", "sentence2"} - set(header)
            if missing:
                raise UserError(f"{path}:{n}: header must name score, sentence1 and sentence2 (missing {', '.join(sorted(missing))})")
            continue
        if len(cols) != len(header):
            problems.append(f"{path}:{n}: expected {len(header)} tab-separated columns, got {len(cols)}")
            continue
        yield n, dict(zip(header, cols))


# ---- STS pairs and classification rows as training data ------------------------------------------------
@dataclass
class Pair:
    """One sentence pair with its gold similarity score (STS / regression)."""

    sentence1: str
    sentence2: str
    score: float
    line: int = 0
    file: int | None = None  # the --data source it came from, in a run of several


@dataclass
class Labelled:
    """One text with its class label."""

    text: str
    label: str
    line: int = 0
    file: int | None = None  # the --data source it came from, in a run of several


@dataclass
class ClassificationData:
    """Texts with labels: held-out rows to score, or the reference rows a kNN or linear probe is fitted on."""

    texts: list[str]
    labels: list[str]
    name: str = ""

    def fingerprint(self) -> str:
        """A hash of the content (texts and labels), for results files."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([self.texts, self.labels], ensure_ascii=False).encode())
        return h.hexdigest()

    @classmethod
    def of(cls, rows: list[Labelled], name: str = "") -> "ClassificationData":
        return cls([r.text for r in rows], [r.label for r in rows], name)


def parse_pair(obj: dict, where: str, problems: list[str]) -> Pair | None:
    """One scored pair {sentence1, sentence2, score} (the score may be a numeric string, as TSV cells are), or None."""
    f = _Fields(obj, where, problems)
    a, b, score = f.text("sentence1"), f.text("sentence2"), obj.get("score")
    try:
        if isinstance(score, bool):
            raise TypeError
        score = float(score)
        if not math.isfinite(score):
            raise ValueError
    except (TypeError, ValueError):
        f.bad("missing field 'score'" if score is None else f"field 'score' is not a number: {score!r}")
    return Pair(a, b, score) if f.ok else None


def parse_labelled(obj: dict, where: str, problems: list[str]) -> Labelled | None:
    """One classification row {text, label}; an integer label is read as its decimal string."""
    f = _Fields(obj, where, problems)
    text, label = f.text("text"), obj.get("label")
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    elif label is None:
        f.bad("missing field 'label'")
    elif not isinstance(label, str):
        f.bad(f"field 'label' must be a string or an integer, got {type(label).__name__}")
    elif not label.strip():
        f.bad("field 'label' is empty")
    return Labelled(text, label) if f.ok else None


TASKS = ("retrieval", "sts", "classification")
# A line's `type` -> its task. FlagEmbedding's own values (normal, only_1neg, symmetric_sts, symmetric_class,
# symmetric_clustering) come on query/pos/neg lines that FlagEmbedding trains contrastively, so they do not force a
# task: the line's fields decide (a query/pos/neg line is retrieval, whatever its FlagEmbedding type). Their meaning
# for the batch (Example.kind) is bge.batching's: only_1neg lines bring one negative, symmetric_class lines at most
# the negatives they have, and symmetric_sts / symmetric_clustering passages get the query instruction too.
TYPE_TASKS = {"retrieval": "retrieval", "sts": "sts", "regression": "sts", "classification": "classification"}
FLAGEMBEDDING_TYPES = ("normal", "only_1neg", "symmetric_sts", "symmetric_class", "symmetric_clustering")
SHAPES = {"sts": {"sentence1", "sentence2", "score"}, "classification": {"text", "label"}}


def line_task(obj: dict, default: str) -> str | None:
    """The task of one JSON line: its `type` if that names one of ours, else `default` unless that is 'auto', else
    its fields (sentence1/sentence2/score: sts; text/label: classification; otherwise retrieval). None: bad type."""
    kind = obj.get("type")
    if kind is not None and kind not in TYPE_TASKS and kind not in FLAGEMBEDDING_TYPES:
        return None
    if kind in TYPE_TASKS:
        return TYPE_TASKS[kind]
    if default != "auto":
        return default
    if SHAPES["sts"] & obj.keys():
        return "sts"
    if SHAPES["classification"] & obj.keys():
        return "classification"
    return "retrieval"


@dataclass
class TrainingData:
    """A training file's lines by task (a file may mix them)."""

    retrieval: list[Example] = field(default_factory=list)
    sts: list[Pair] = field(default_factory=list)
    classification: list[Labelled] = field(default_factory=list)

    def by_task(self) -> dict[str, list]:
        """The tasks that have lines, in TASKS order."""
        return {t: getattr(self, t) for t in TASKS if getattr(self, t)}


def load_training_file(path: str | Path, task: str = "auto", skip_bad_lines: bool = False) -> tuple[TrainingData, list[str]]:
    """Training lines of a JSONL file (retrieval, STS and classification lines, mixed) or an STS TSV, and the
    problems of the lines skipped. `task` is the file's task for lines without a `type` of ours ('auto': by their
    fields). Without skip_bad_lines any problem raises DataError listing every bad line."""
    path = Path(path)
    if task not in ("auto", *TASKS):
        raise ValueError(f"unknown task {task!r}")
    if path.suffix in (".tsv", ".csv", ".txt"):
        if task not in ("auto", "sts"):
            raise UserError(f"{path}: a TSV file holds STS pairs; it cannot be read as --task {task}")
        sts = load_sts(path)
        pairs = [Pair(a, b, s, n) for a, b, s, n in zip(sts.sentence1, sts.sentence2, sts.scores, sts.lines)]
        return TrainingData(sts=pairs), []
    problems: list[str] = []
    out = TrainingData()
    first_line: dict[str, int] = {}  # retrieval qid -> the line that used it first
    for n, obj in read_json_objects(path, problems):
        where = f"{path}:{n}"
        kind = line_task(obj, task)
        if kind is None:
            problems.append(f"{where}: field 'type' must be one of {', '.join([*TYPE_TASKS, *FLAGEMBEDDING_TYPES])}, "
                            f"got {obj['type']!r}")
            continue
        need = SHAPES.get(kind, ())
        if need and not need & obj.keys():  # told the task by its type or --task, but shaped as another
            problems.append(f"{where}: {kind} lines need the fields {', '.join(sorted(need))}; this one has "
                            f"{', '.join(sorted(obj)) or 'none'}")
            continue
        item = {"retrieval": parse_example, "sts": parse_pair, "classification": parse_labelled}[kind](obj, where, problems)
        if item is None:
            continue
        item.line = n
        if kind == "retrieval" and not claim_qid(item, first_line, where, problems):
            continue
        getattr(out, kind).append(item)
    if problems and not skip_bad_lines:
        raise DataError(path, problems, hint="fix them, or pass --skip-bad-lines to drop them")
    if not out.by_task():
        raise UserError(f"{path}: no training examples")
    return out, problems


# ---- --data: one or more sources, read into one training set ---------------------------------------------
NO_IN_BATCH = "no_in_batch_neg"  # FlagEmbedding's name suffix for data trained without in-batch negatives


@dataclass(frozen=True)
class Source:
    """One training source of --data: a file (JSONL, or STS TSV) or a BEIR folder."""

    path: Path
    beir: bool = False
    in_batch_negatives: bool = True  # False: the file's stem, or its folder's name, ends in no_in_batch_neg
    extra: bool = False  # an --extra-data source: trained on, never held out


def data_sources(paths: tuple[str, ...] | list[str], extra: tuple[str, ...] | list[str] = ()) -> list[Source]:
    """--data's sources in order, then --extra-data's (`extra`: marked so): a file as it is, a BEIR folder (it has
    corpus.jsonl) as one source, any other folder as its *.jsonl files (sorted). A file whose stem, or a folder whose
    name, ends in no_in_batch_neg trains without in-batch negatives, as FlagEmbedding reads its training data."""
    if not paths:
        raise UserError("--data is required (FlagEmbedding-format JSONL files, STS TSV files, BEIR folders, or folders "
                        "of JSONL files)")
    out, seen = [], {}
    for flag, given in [("--data", p) for p in paths] + [("--extra-data", p) for p in extra]:
        path = Path(given)
        if not path.exists():
            raise UserError(f"{flag} {given}: no such file or folder")
        if path.is_dir() and not (path / "corpus.jsonl").exists():
            files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
            if not files:
                raise UserError(f"{flag} {given}: neither a BEIR folder (corpus.jsonl, queries.jsonl, qrels/) nor a "
                                f"folder of *.jsonl files")
            folder_off = path.resolve().name.endswith(NO_IN_BATCH)
            found = [Source(f, False, not (folder_off or f.stem.endswith(NO_IN_BATCH)), flag == "--extra-data")
                     for f in files]
        else:
            name = path.resolve().name if path.is_dir() else path.stem
            found = [Source(path, path.is_dir(), not name.endswith(NO_IN_BATCH), flag == "--extra-data")]
        for src in found:
            key = src.path.resolve()
            if key in seen:
                raise UserError(f"{flag}: {src.path} is given twice (also as {seen[key]})")
            seen[key] = src.path
            out.append(src)
    return out


@dataclass
class TrainingSet:
    """Every --data source's items by task, and the retrieval evaluation set they make; --extra-data's items apart."""

    items: dict[str, list]  # task -> its items from every --data source, in TASKS order (what the split carves)
    full: RetrievalData | None  # queries, corpus and qrels of the retrieval items (what is carved and mined from)
    sources: list[Source]  # --data's, then --extra-data's; an item's `file` is its source's index here
    name: str  # what the held-out sets are called: the source's file name, or the names joined
    notes: list[str] = field(default_factory=list)  # one line per remark: skipped lines, each source's counts
    extra_items: dict[str, list] = field(default_factory=dict)  # task -> --extra-data's items: trained on, never held out
    extra_sets: dict[int, RetrievalData] = field(default_factory=dict)  # --extra-data source -> its own set, to mine from


def namespaced(data: RetrievalData, k: int) -> RetrievalData:
    """A BEIR folder's set with its query and document ids prefixed "<k>:", as its items' qids are in a run of several
    sources."""
    return RetrievalData({f"{k}:{q}": t for q, t in data.queries.items()}, {f"{k}:{d}": t for d, t in data.corpus.items()},
                         {f"{k}:{q}": {f"{k}:{d}": g for d, g in r.items()} for q, r in data.qrels.items()},
                         {f"{k}:{q}": p for q, p in data.prompts.items()}, data.name)


def read_training_data(sources: list[Source], task: str = "auto", split: str = "train", use_title: bool = True,
                       corpus: str = "", skip_bad_lines: bool = False) -> TrainingSet:
    """The items of every source. One --data source is read as it always was. Of several, each item remembers its
    source (`file`) and its ids are namespaced by it ("<file>:<qid>"; STS and classification ids are "<file>:<line>"),
    so two files' line numbers or two folders' query and document ids never collide; the retrieval evaluation set is
    the union of the --data sources' (a BEIR folder's graded qrels kept), over --corpus and their BEIR corpora.
    --extra-data sources (after --data's) are always namespaced, so that adding one leaves --data's ids, and with them
    the split and the held-out sets, as they were; their items and each one's own retrieval set are kept apart."""
    carved = [src for src in sources if not src.extra]
    several, notes = len(carved) > 1, []
    items: dict[str, list] = {}
    extra_items: dict[str, list] = {}
    extra_sets: dict[int, RetrievalData] = {}
    beir_corpus, beir_qrels = {}, {}
    full = None
    for k, src in enumerate(sources):
        if src.beir:
            if task not in ("auto", "retrieval"):
                raise UserError(f"{'--extra-data' if src.extra else '--data'} {src.path} is a BEIR folder (retrieval); "
                                f"it cannot be read as --task {task}")
            if corpus and not several and not src.extra:
                raise UserError("--corpus is for a JSONL --data; a BEIR folder brings its own corpus")
            beir = load_beir(src.path, split, use_title=use_title)
            part = {"retrieval": examples_from_beir(beir)}
            if not src.extra:
                full = beir
        else:
            data, skipped = load_training_file(src.path, task, skip_bad_lines=skip_bad_lines)
            if skipped:
                notes.append(f"[yellow]skipped {len(skipped)} bad line(s) of {src.path}[/] (--skip-bad-lines); "
                             f"first: {skipped[0]}")
            part = data.by_task()
        if several or src.extra:
            for rows in part.values():
                for it in rows:
                    it.file = k
                    if isinstance(it, Example):
                        it.qid = f"{k}:{it.qid}"
            own = namespaced(beir, k) if src.beir else None
            if own is not None and not src.extra:
                beir_corpus |= own.corpus
                beir_qrels |= own.qrels
        if src.extra and "retrieval" in part:  # mined against its own passages, never against --data's corpus
            extra_sets[k] = own if own is not None else retrieval_from_examples(part["retrieval"], name=src.path.name)
        for name, rows in part.items():
            (extra_items if src.extra else items).setdefault(name, []).extend(rows)
        if len(sources) > 1 or not src.in_batch_negatives:
            counts = ", ".join(f"{len(rows)} {name}" for name, rows in part.items())
            notes.append(f"{'--extra-data' if src.extra else '--data'} {src.path}: {counts} "
                         f"{'queries (BEIR)' if src.beir else 'line(s)'}"
                         + ("" if src.in_batch_negatives else "; no in-batch negatives (its name ends in no_in_batch_neg)")
                         + ("; trained on, never held out" if src.extra else ""))
    items = {t: items[t] for t in TASKS if t in items}
    names = [s.path.name for s in carved]
    name = names[0] if not several else "+".join(names) if len(names) <= 3 else f"{names[0]}+{len(names) - 1} more"
    if "retrieval" in items and (several or not carved[0].beir):
        given = load_corpus(corpus, use_title=use_title) if corpus else {}
        full = retrieval_from_examples(items["retrieval"], name=name, corpus={**given, **beir_corpus})
        full.qrels.update({q: r for q, r in beir_qrels.items() if q in full.queries})  # graded, as the folder has them
    return TrainingSet(items, full, sources, name, notes, extra_items, extra_sets)


# ---- reading evaluation data ----------------------------------------------------------------------------
def load_eval_data(path: str | Path, split: str = "test",
                   use_title: bool = True) -> RetrievalData | STSData | ClassificationData:
    """A BEIR folder (-> RetrievalData of `split`), a training-format JSONL (-> RetrievalData: each query's positives
    are its relevant documents), an STS file (TSV with a score/sentence1/sentence2 header, or such JSONL), or a
    JSONL of {text, label} rows (-> ClassificationData)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "corpus.jsonl").exists():
            raise UserError(f"{path}: not a BEIR folder (no corpus.jsonl)")
        qrels = path / "qrels"
        if not (qrels / f"{split}.tsv").exists():
            splits = sorted(p.stem for p in qrels.glob("*.tsv")) if qrels.is_dir() else []
            have = f"it has {', '.join(splits)}; pass --split" if splits else "it has no qrels/*.tsv"
            raise UserError(f"{path}: no split {split!r} (qrels/{split}.tsv); {have}")
        return load_beir(path, split, use_title=use_title)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.suffix in (".tsv", ".csv", ".txt"):
        return load_sts(path)
    if path.suffix != ".jsonl":
        raise UserError(f"{path}: expected a BEIR folder, a .jsonl file or an STS .tsv file")
    problems: list[str] = []
    first = next(read_json_objects(path, problems), None)  # the first valid line tells which format it is
    if first is None:
        raise DataError(path, problems) if problems else UserError(f"{path}: the file is empty")
    n, obj = first
    if "sentence1" in obj or "score" in obj:
        return load_sts(path)
    if "query" in obj or "anchor" in obj:
        examples, _ = load_examples(path)
        return retrieval_from_examples(examples, name=path.name)
    if "text" in obj or "label" in obj:
        rows = load_training_file(path, task="classification")[0].classification
        return ClassificationData.of(rows, name=path.name)
    raise UserError(f"{path}:{n}: neither a training line (query, pos, neg), an STS pair (score, sentence1, "
                    f"sentence2) nor a classification row (text, label); fields are {', '.join(sorted(obj)) or 'none'}")
