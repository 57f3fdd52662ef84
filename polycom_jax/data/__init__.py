"""Input data: tokenizers, TFDS sources (incl. a built-in local corpus), packed grain pipelines."""

from polycom_jax.data.pipeline import make_eval_iterator
from polycom_jax.data.pipeline import make_train_iterator
from polycom_jax.data.sources import check_data_config
from polycom_jax.data.sources import check_resumable
from polycom_jax.data.sources import get_data_source
from polycom_jax.data.sources import resolve_data_dir
from polycom_jax.data.tokenizers import ByteTokenizer
from polycom_jax.data.tokenizers import get_tokenizer
from polycom_jax.data.tokenizers import HuggingFaceTokenizer
from polycom_jax.data.tokenizers import SentencePieceTokenizer
from polycom_jax.data.tokenizers import Tokenizer
