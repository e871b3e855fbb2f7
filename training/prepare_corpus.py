"""Build the demo model's training corpus from freely licensed Debian packages.

Sources (install with ``apt-get install -y fortunes fortunes-min jargon-text python3.11-doc``):

- fortune cookies   /usr/share/games/fortunes/*      (fortunes, fortunes-min; BSD-3-Clause)
- the Jargon File   /usr/share/doc/jargon-text/jargon.txt.gz   (jargon-text; public domain)
- Python 3.11 docs  /usr/share/doc/python3.11/html/_sources/**/*.rst.txt
                                                      (python3.11-doc; PSF License v2)

Each source is cut into *documents* (one fortune, one Jargon entry, one section of a Python
doc page).  Every document becomes one JSON line ``{"id", "source", "kind", ...}``:

- ``kind="plain"``: ``{"text": ...}``, trained on as ``<s> text</s>``;
- ``kind="chat"``:  ``{"question": ..., "answer": ...}``, trained on in the Mixtral-Instruct v1
  format ``<s>[INST] question [/INST] answer</s>`` (the token layout of
  ``offload_rt.chat_template.encode_chat``).

Pseudo question/answer pairs: a Jargon entry's headword -> "What does 'X' mean?"; a
Python section title -> "Tell me about X in Python."; a fortune's first line -> the rest;
a riddle / knock-knock fortune -> its setup line; some one-liners -> "Tell me a fortune.".
The choice per document is a seeded draw, so the corpus is identical on every run.

Validation split: documents are sorted by their stable id, shuffled with
``random.Random(seed)`` and the first ``--val-fraction`` (default 2%) of them are held out
(``val.jsonl``); the rest is ``train.jsonl``.  Splitting by document (not by token window)
keeps a held-out fortune or Jargon entry wholly unseen during training.

    python training/prepare_corpus.py --out /tmp/offload_rt_demo/corpus
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import sys
from pathlib import Path

FORTUNE_DIR = Path("/usr/share/games/fortunes")
JARGON_FILE = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
PYDOC_DIR = Path("/usr/share/doc/python3.11/html/_sources")

# Pictures, not prose.
FORTUNE_SKIP = {"art", "ascii-art"}
LICENSES = {
    "fortunes": "BSD-3-Clause (fortune-mod, Debian packages fortunes / fortunes-min; "
                "see /usr/share/doc/fortunes/copyright)",
    "jargon": "Public domain (The Jargon File 4.4.x, Debian package jargon-text; "
              "see /usr/share/doc/jargon-text/copyright)",
    "pydoc": "PSF License Version 2 (Python 3.11 documentation, Debian package python3.11-doc; "
             "see /usr/share/doc/python3.11-doc/copyright)",
}


# ---- fortunes ------------------------------------------------------------------------------

_OVERSTRIKE = re.compile(r".\x08")


def _clean(text: str) -> str:
    text = _OVERSTRIKE.sub("", text).replace("\x08", "")
    text = text.replace("\t", "    ").replace("\r", "")
    text = "".join(ch for ch in text if ch == "\n" or ch >= " ")
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n")


def read_fortunes() -> list[dict]:
    docs = []
    for path in sorted(FORTUNE_DIR.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or path.name in FORTUNE_SKIP:
            continue
        raw = path.read_bytes().decode("utf-8", errors="replace")
        for n, chunk in enumerate(re.split(r"\n%\n", raw)):
            text = _clean(chunk.strip("%\n"))
            if len(text) < 20:
                continue
            docs.append({"id": f"fortunes/{path.name}/{n}", "source": "fortunes",
                         "topic": path.name, "text": text})
    return docs


def _dedent(text: str) -> str:
    return "\n".join(line.strip() for line in text.split("\n"))


def fortune_doc(doc: dict, rng: random.Random) -> dict:
    text = doc["text"]
    lines = [line for line in text.split("\n") if line.strip()]
    base = {"id": doc["id"], "source": "fortunes"}
    roll = rng.random()
    # Riddles: "Q: ... A: ..." forms and knock-knock jokes read well as a chat.
    qa = re.match(r"^\s*Q:\s*(.+?)\n\s*A:\s*(.+)$", text, re.DOTALL)
    if qa and roll < 0.8:
        return {**base, "kind": "chat", "question": " ".join(qa.group(1).split()),
                "answer": _dedent(qa.group(2)).strip()}
    if len(lines) >= 3 and roll < 0.35:
        first = lines[0].strip()
        rest = _dedent("\n".join(lines[1:])).strip()
        return {**base, "kind": "chat", "question": first, "answer": rest}
    if roll < 0.5:
        topic = doc["topic"].replace("-", " and ")
        prompts = ["Tell me a fortune.", f"Tell me something about {topic}.",
                   "Say something wise.", "Tell me a joke.", f"Give me a quote about {topic}."]
        return {**base, "kind": "chat", "question": rng.choice(prompts), "answer": text}
    return {**base, "kind": "plain", "text": text}


# ---- the Jargon File -----------------------------------------------------------------------

_ENTRY = re.compile(r"^   :(.+?):\s?(.*)$")
_SECTION = re.compile(r"^  \S")


def _paragraphs(lines: list[str]) -> str:
    paras, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def read_jargon() -> list[dict]:
    with gzip.open(JARGON_FILE, "rt", encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    entries, head, body, started = [], None, [], False

    def flush() -> None:
        if head is not None:
            text = _paragraphs(body)
            text = re.sub(r"\{([^{}]*)\}", r"\1", text)
            if len(text) >= 20:
                entries.append((head, text))

    collecting = False
    for line in lines:
        m = _ENTRY.match(line)
        if m:
            flush()
            started, collecting = True, True
            word, rest = m.group(1).strip(), m.group(2).strip()
            head, body = (word, rest), []
            continue
        if not started:
            continue
        if line and not line.startswith(" "):  # an appendix title: the lexicon is over
            flush()
            head = None
            break
        if _SECTION.match(line):  # a letter heading followed by a list of headwords
            collecting = False
            continue
        if collecting:
            body.append(line)
    flush()
    docs = []
    for n, ((word, grammar), text) in enumerate(entries):
        docs.append({"id": f"jargon/{n:05d}", "source": "jargon", "word": word,
                     "grammar": grammar, "text": text})
    return docs


def jargon_doc(doc: dict, rng: random.Random) -> dict:
    base = {"id": doc["id"], "source": "jargon"}
    word, text = doc["word"], doc["text"]
    roll = rng.random()
    if roll < 0.6:
        q = rng.choice([f"What does '{word}' mean?", f"What is {word}?",
                        f"Define '{word}'.", f"What does the jargon word '{word}' mean?"])
        return {**base, "kind": "chat", "question": q, "answer": text}
    grammar = f" {doc['grammar']}" if doc["grammar"] and doc["grammar"] != "//" else ""
    return {**base, "kind": "plain", "text": f"{word}:{grammar}\n\n{text}"}


# ---- Python documentation -----------------------------------------------------------------

_ROLE = re.compile(r":[a-zA-Z0-9_:+-]+:`(?:[^`<]*<)?~?!?([^`>]+)>?`")
_LITERAL = re.compile(r"``([^`]+)``")
_LINK = re.compile(r"`([^`<]+?)\s*(?:<[^`>]+>)?`_{1,2}")
_UNDERLINE = re.compile(r"^([=\-~^\"'*+#`.:])\1{2,}\s*$")


def _inline(text: str) -> str:
    text = _ROLE.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<!\w)\*([^*\s][^*]*)\*(?!\w)", r"\1", text)
    text = re.sub(r"\|([^|\s]+)\|", r"\1", text)
    return text.replace("\\", "")


def read_pydoc() -> list[dict]:
    """Sections of the rst sources: title + prose paragraphs (code, tables, directives dropped)."""
    docs = []
    for path in sorted(PYDOC_DIR.rglob("*.rst.txt")):
        rel = path.relative_to(PYDOC_DIR).as_posix()
        if rel.startswith(("whatsnew/changelog", "license")):
            continue
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
        sections: list[tuple[str, list[str]]] = [("", [])]
        para: list[str] = []
        skip_indented = False

        def end_para(para: list[str] = para,
                     sections: list[tuple[str, list[str]]] = sections) -> None:
            if para:
                sections[-1][1].append(_inline(" ".join(s.strip() for s in para)))
                para.clear()

        i = 0
        while i < len(lines):
            line = lines[i]
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if (line.strip() and not line.startswith(" ") and _UNDERLINE.match(nxt)
                    and not _UNDERLINE.match(line)):
                end_para()
                sections.append((_inline(line.strip()), []))
                i += 2
                skip_indented = False
                continue
            if _UNDERLINE.match(line):
                i += 1
                continue
            if not line.strip():
                end_para()
                i += 1
                continue
            if line.startswith((" ", "\t")):
                # indented: code blocks, directive bodies, tables -- skipped
                end_para()
                i += 1
                continue
            if line.startswith(("..", "+", "|", ">>>", "=", "*", "-", "#")) or skip_indented:
                end_para()
                i += 1
                continue
            para.append(line)
            if line.rstrip().endswith("::"):
                para[-1] = line.rstrip()[:-1]
            i += 1
        end_para()
        for n, (title, paras) in enumerate(sections):
            paras = [p for p in paras if len(p) >= 40 and p.count(" ") >= 5]
            if not paras:
                continue
            docs.append({"id": f"pydoc/{rel}/{n:03d}", "source": "pydoc", "title": title,
                         "text": "\n\n".join(paras)})
    return docs


def pydoc_doc(doc: dict, rng: random.Random) -> dict:
    base = {"id": doc["id"], "source": "pydoc"}
    title = doc["title"].rstrip(".:")
    if title and rng.random() < 0.3:
        q = rng.choice([f"Tell me about {title} in Python.", f"Explain {title}.",
                        f"What is {title}?"])
        answer = doc["text"].split("\n\n")[0] if rng.random() < 0.5 else doc["text"]
        return {**base, "kind": "chat", "question": q, "answer": answer}
    text = f"{title}\n\n{doc['text']}" if title else doc["text"]
    return {**base, "kind": "plain", "text": text}


# ---- assembly ------------------------------------------------------------------------------

def _doc_rng(seed: int, doc_id: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def build(seed: int = 1234, val_fraction: float = 0.02,
          pydoc_max_chars: int = 4000) -> tuple[list[dict], list[dict], dict]:
    raw = {"fortunes": read_fortunes(), "jargon": read_jargon(), "pydoc": read_pydoc()}
    makers = {"fortunes": fortune_doc, "jargon": jargon_doc, "pydoc": pydoc_doc}
    docs = []
    for source, items in raw.items():
        for item in items:
            if source == "pydoc" and len(item["text"]) > pydoc_max_chars:
                item = {**item, "text": item["text"][:pydoc_max_chars].rsplit("\n\n", 1)[0]}
            docs.append(makers[source](item, _doc_rng(seed, item["id"])))
    docs.sort(key=lambda d: d["id"])
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(docs) * val_fraction))
    val_idx = set(order[:n_val])
    train = [docs[i] for i in order[n_val:]]
    val = sorted((docs[i] for i in val_idx), key=lambda d: d["id"])
    stats: dict = {"seed": seed, "val_fraction": val_fraction, "licenses": LICENSES}
    for name, part in (("train", train), ("val", val)):
        s = stats[name] = {"docs": len(part), "chars": 0, "chat_docs": 0, "by_source": {}}
        for d in part:
            n = len(d.get("text", "")) + len(d.get("question", "")) + len(d.get("answer", ""))
            s["chars"] += n
            s["chat_docs"] += d["kind"] == "chat"
            s["by_source"].setdefault(d["source"], 0)
            s["by_source"][d["source"]] += 1
    return train, val, stats


def write_jsonl(path: Path, docs: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/offload_rt_demo/corpus")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--val-fraction", type=float, default=0.02)
    args = ap.parse_args(argv)
    for p in (FORTUNE_DIR, JARGON_FILE, PYDOC_DIR):
        if not p.exists():
            print(f"missing {p}: apt-get install -y fortunes fortunes-min jargon-text "
                  "python3.11-doc", file=sys.stderr)
            return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val, stats = build(args.seed, args.val_fraction)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
