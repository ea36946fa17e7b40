"""A small RefCOCO in the refer toolkit's own layout, built from real COCO annotations (../shared/data/coco_tiny).

    python tests/refcoco_fixture.py OUT_DIR     # OUT_DIR/refcoco/refs(unc).p + OUT_DIR/refcoco/instances.json

The expressions are made up from the ground-truth boxes, deterministically: per image (the ones whose picture is in
coco_tiny/val2017, by id), per category in order of first annotation: a lone object is "the {name}"; with two or more,
the leftmost and rightmost (by box centre) are "the {name} on the left" / "the {name} on the right", and the largest,
when it is neither, "the biggest {name}"; at most 4 refs per image, boxes at least 8 px wide and tall, no crowd
annotations. Splits go by image: val, testA, testB, train, val, ... (the RefCOCO splits are image-disjoint).

`refs(unc).p` is written the way Python 2's cPickle wrote the refer files (protocol 2): str values and dict keys as
SHORT_BINSTRING / BINSTRING (Python 2 byte strings), one sentence as BINUNICODE (a Python 2 unicode), one as a byte
string holding UTF-8 ("café"), every container and string memoized with BINPUT / LONG_BINPUT, repeated dict keys
fetched back with BINGET (interned keys), MARK ... APPENDS / SETITEMS in batches of 1000, BININT1/2/BININT for ints.
Python 3's pickle cannot write that (its protocol-2 str is BINUNICODE and its bytes go through a _codecs.encode
REDUCE), hence the small writer below.

The same refs can be written in the JSON forms the evaluator reads (`write_mdetr`, `write_expression_list`), and a
proposal file with jittered ground-truth boxes (`write_proposals`).
"""
from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass
from typing import Any, Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
COCO_TINY = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data", "coco_tiny")
COCO_ANN = os.path.join(COCO_TINY, "annotations", "instances_val2017.json")
COCO_IMAGES = os.path.join(COCO_TINY, "val2017")
SPLITS = ("val", "testA", "testB", "train")


# ---------------------------------------------------------------------------------------------------------------
# A Python 2 cPickle (protocol 2) writer for plain data
# ---------------------------------------------------------------------------------------------------------------

class Py2Unicode(str):
    """A str to be written as a Python 2 `unicode` (BINUNICODE); plain str is written as a Python 2 byte string."""


class Py2Bytes(bytes):
    """Raw Python 2 byte-string content (e.g. UTF-8 text written by a Python 2 program without decoding)."""


class Py2Pickler:
    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")            # PROTO 2
        self.n_memo = 0                              # memo entries written so far
        self.interned: Dict[str, int] = {}           # dict keys: interned in Python 2, pickled once then BINGET
        self.seen: Dict[int, int] = {}               # id of a unicode object -> memo index (one object, one copy)

    def put(self) -> int:
        i = self.n_memo
        self.n_memo += 1
        self.out += b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)
        return i

    def get(self, i: int) -> None:
        self.out += b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i)

    def save(self, obj: Any, key: bool = False) -> None:
        o = self.out
        if obj is None:
            o += b"N"
        elif obj is True or obj is False:
            o += b"\x88" if obj else b"\x89"
        elif isinstance(obj, int):
            if 0 <= obj < 256:
                o += b"K" + bytes([obj])
            elif 0 <= obj < 65536:
                o += b"M" + struct.pack("<H", obj)
            elif -2**31 <= obj < 2**31:
                o += b"J" + struct.pack("<i", obj)
            else:
                raw = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
                o += b"\x8a" + bytes([len(raw)]) + raw
        elif isinstance(obj, float):
            o += b"G" + struct.pack(">d", obj)
        elif isinstance(obj, Py2Unicode):
            if id(obj) in self.seen:
                self.get(self.seen[id(obj)])
                return
            data = obj.encode("utf-8")
            o += b"X" + struct.pack("<I", len(data)) + data
            self.seen[id(obj)] = self.put()
        elif isinstance(obj, (str, Py2Bytes)):
            if key and isinstance(obj, str) and obj in self.interned:
                self.get(self.interned[obj])
                return
            b = obj.encode("ascii") if isinstance(obj, str) else bytes(obj)
            o += (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b
            i = self.put()
            if key and isinstance(obj, str):
                self.interned[obj] = i
        elif isinstance(obj, list):
            o += b"]"
            self.put()
            self._batch(obj, b"a", b"e", lambda x: self.save(x))
        elif isinstance(obj, dict):
            o += b"}"
            self.put()
            self._batch(list(obj.items()), b"s", b"u", lambda kv: (self.save(kv[0], key=True), self.save(kv[1])))
        elif isinstance(obj, tuple):
            if not obj:
                o += b")"
                return
            if len(obj) <= 3:
                for x in obj:
                    self.save(x)
                o += {1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(obj)]
            else:
                o += b"("
                for x in obj:
                    self.save(x)
                o += b"t"
            self.put()
        else:
            raise TypeError(f"Py2Pickler writes plain data only, not {type(obj).__name__}")

    def _batch(self, seq: list, one: bytes, many: bytes, save) -> None:
        for start in range(0, len(seq), 1000):
            chunk = seq[start:start + 1000]
            if len(chunk) == 1:
                save(chunk[0])
                self.out += one
            else:
                self.out += b"("
                for x in chunk:
                    save(x)
                self.out += many

    def dumps(self, obj: Any) -> bytes:
        self.save(obj)
        self.out += b"."
        return bytes(self.out)


def py2_dumps(obj: Any) -> bytes:
    """obj pickled as Python 2's cPickle.dump(obj, f, 2) wrote plain data."""
    return Py2Pickler().dumps(obj)


# ---------------------------------------------------------------------------------------------------------------
# The fixture
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Expected:
    key: str
    split: str
    file_name: str
    image_id: int
    expression: str
    box: tuple          # xyxy, from the COCO bbox
    ref_id: int
    ann_id: int


def _refs_for_image(anns: List[dict], names: Dict[int, str]) -> List[tuple]:
    """[(ann, [sentences])] for one image."""
    by_cat: Dict[int, List[dict]] = {}
    for a in anns:
        by_cat.setdefault(a["category_id"], []).append(a)
    out = []
    for cat, group in by_cat.items():
        name = names[cat]
        if len(group) == 1:
            out.append((group[0], [f"the {name}", name]))
            continue
        cx = [a["bbox"][0] + a["bbox"][2] / 2 for a in group]
        left = group[int(np.argmin(cx))]
        right = group[int(np.argmax(cx))]
        out.append((left, [f"the {name} on the left", f"leftmost {name}"]))
        out.append((right, [f"the {name} on the right"]))
        big = max(group, key=lambda a: a["bbox"][2] * a["bbox"][3])
        if big["id"] not in (left["id"], right["id"]):
            out.append((big, [f"the biggest {name}"]))
    return out[:4]


def build(out_dir: str, coco_ann: str = COCO_ANN, images_dir: str = COCO_IMAGES) -> Dict[str, Any]:
    """Write out_dir/refcoco/refs(unc).p and instances.json; return {"folder", "refs", "instances", "expected"
    (list of Expected, every sentence of every ref, file order)}."""
    with open(coco_ann) as f:
        coco = json.load(f)
    present = set(os.listdir(images_dir))
    images = sorted((im for im in coco["images"] if im["file_name"] in present), key=lambda im: im["id"])
    ids = {im["id"] for im in images}
    anns = [a for a in coco["annotations"] if a["image_id"] in ids]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_image: Dict[int, List[dict]] = {}
    for a in sorted(anns, key=lambda a: a["id"]):
        if not a["iscrowd"] and a["bbox"][2] >= 8 and a["bbox"][3] >= 8:
            per_image.setdefault(a["image_id"], []).append(a)
    refs, expected = [], []
    ref_id = sent_id = 0
    for n, im in enumerate(images):
        split = SPLITS[n % len(SPLITS)]
        stem = os.path.splitext(im["file_name"])[0]
        for ann, sents in _refs_for_image(per_image.get(im["id"], []), names):
            sentences: List[Dict[str, Any]] = []
            for text in sents:
                sentences.append({"tokens": text.split(), "raw": text, "sent_id": sent_id, "sent": text})
                sent_id += 1
            if ref_id == 0:          # a Python 2 byte string holding UTF-8, as a Python 2 program wrote it
                cafe = Py2Bytes("the one near the café".encode("utf-8"))
                sentences.append({"tokens": ["the", "one", "near", "the", Py2Bytes("café".encode("utf-8"))],
                                  "raw": cafe, "sent_id": sent_id, "sent": cafe})
                sent_id += 1
            if ref_id == 1:          # a Python 2 unicode sentence
                sentences[0]["sent"] = sentences[0]["raw"] = Py2Unicode(sentences[0]["sent"] + " (naïve)")
            x, y, w, h = ann["bbox"]
            ref = {"sent_ids": [s["sent_id"] for s in sentences], "file_name": f"{stem}_{ann['id']}.jpg",
                   "ann_id": ann["id"], "ref_id": ref_id, "image_id": im["id"], "split": split,
                   "sentences": sentences, "category_id": ann["category_id"]}
            refs.append(ref)
            for s in sentences:
                text = s["sent"].decode("utf-8") if isinstance(s["sent"], bytes) else str(s["sent"])
                expected.append(Expected(f"sent{s['sent_id']}", split, im["file_name"], im["id"], text,
                                         (x, y, x + w, y + h), ref_id, ann["id"]))
            ref_id += 1
    folder = os.path.join(out_dir, "refcoco")
    os.makedirs(folder, exist_ok=True)
    refs_path = os.path.join(folder, "refs(unc).p")
    with open(refs_path, "wb") as f:
        f.write(py2_dumps(refs))
    inst = {"images": images, "annotations": anns, "categories": coco["categories"]}
    inst_path = os.path.join(folder, "instances.json")
    with open(inst_path, "w") as f:
        json.dump(inst, f)
    return {"folder": folder, "refs": refs_path, "instances": inst_path, "expected": expected,
            "coco_images": images, "coco_annotations": anns}


def write_mdetr(fix: Dict[str, Any], out_dir: str, split: str) -> str:
    """The MDETR conversion (scripts/fine-tuning/refexp_coco_format.py) of one split: finetune_refcoco_{split}.json,
    one image entry per expression with "caption" and "original_id", one annotation (the referent) each."""
    by_id = {a["id"]: a for a in fix["coco_annotations"]}
    images, annotations = [], []
    for e in fix["expected"]:
        if e.split != split:
            continue
        eid = len(images)
        ann = by_id[e.ann_id]
        images.append({"file_name": e.file_name, "height": 0, "width": 0, "id": 1000 + eid, "original_id": e.image_id,
                       "caption": e.expression, "dataset_name": "refcoco", "tokens_negative": []})
        annotations.append({"area": ann["area"], "iscrowd": 0, "image_id": 1000 + eid, "category_id":
                            ann["category_id"], "id": 5000 + eid, "bbox": ann["bbox"], "original_id": ann["id"],
                            "tokens_positive": []})
    path = os.path.join(out_dir, f"finetune_refcoco_{split}.json")
    with open(path, "w") as f:
        json.dump({"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": []}, f)
    return path


def write_expression_list(fix: Dict[str, Any], out_dir: str, split: str) -> str:
    """The Qwen-VL / InternVL evaluation layout: refcoco_{split}.jsonl, {"image", "sent", "bbox" (xyxy), "height",
    "width"} per line."""
    sizes = {im["id"]: (im["width"], im["height"]) for im in fix["coco_images"]}
    path = os.path.join(out_dir, f"refcoco_{split}.jsonl")
    with open(path, "w") as f:
        for e in fix["expected"]:
            if e.split == split:
                w, h = sizes[e.image_id]
                f.write(json.dumps({"image": f"train2014/{e.file_name}", "sent": e.expression,
                                    "bbox": list(e.box), "height": h, "width": w}) + "\n")
    return path


def write_proposals(fix: Dict[str, Any], path: str, seed: int = 0) -> str:
    """A COCO detection-results file: per ground-truth annotation one box shifted right by a fraction s of its width
    (s cycles through 0, 0.1, 0.3, 0.4, 0.6: IoU (1-s)/(1+s) = 1, 0.82, 0.54, 0.43, 0.25), plus 3 random boxes per
    image; scores descending in file order."""
    rng = np.random.default_rng(seed)
    shifts = (0.0, 0.1, 0.3, 0.4, 0.6)
    dets = []
    sizes = {im["id"]: (im["width"], im["height"]) for im in fix["coco_images"]}
    for k, a in enumerate(sorted(fix["coco_annotations"], key=lambda a: a["id"])):
        if a["iscrowd"]:
            continue
        x, y, w, h = a["bbox"]
        s = shifts[k % len(shifts)]
        dets.append({"image_id": a["image_id"], "category_id": 1, "bbox": [x + s * w, y, w, h],
                     "score": round(0.95 - 0.001 * (k % 500), 3)})
    for iid, (W, H) in sorted(sizes.items()):
        for _ in range(3):
            x1, y1 = rng.uniform(0, W * 0.7), rng.uniform(0, H * 0.7)
            dets.append({"image_id": iid, "category_id": 1, "bbox": [x1, y1, rng.uniform(10, W * 0.3),
                                                                     rng.uniform(10, H * 0.3)], "score": 0.31})
    with open(path, "w") as f:
        json.dump(dets, f)
    return path


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "refcoco_fixture"
    fx = build(out)
    print(f"{fx['refs']}: {len(fx['expected'])} expressions; {fx['instances']}")
