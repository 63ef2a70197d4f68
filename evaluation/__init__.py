"""The paper's measurements: sliding-window perplexity, passkey retrieval, the Figure-2
attention-score analysis and sampling, plus a callback that tracks them during fine-tuning."""

from evaluation.attention import analyse_coefficients, fit_random_scores, query_key_coefficients
from evaluation.errors import EvaluationError
from evaluation.generation import generate
from evaluation.limits import check_window, extended_window, readable_length
from evaluation.passkey import PasskeyPrompter, PasskeyResult, k_max, run_passkey
from evaluation.perplexity import PerplexityResult, Span, sliding_spans, sliding_window_perplexity, window_stride

__all__ = [
    "EvaluationError",
    "PasskeyPrompter",
    "PasskeyResult",
    "PerplexityResult",
    "Span",
    "analyse_coefficients",
    "check_window",
    "extended_window",
    "fit_random_scores",
    "generate",
    "k_max",
    "query_key_coefficients",
    "readable_length",
    "run_passkey",
    "sliding_spans",
    "sliding_window_perplexity",
    "window_stride",
]
