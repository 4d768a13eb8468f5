"""Default data config (embedded by configs/default.py as config.data)."""
import ml_collections


def default_data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "books"           # one of: books, text_dir, tfds, markov, copy, passkey
  c.data_dir = ""            # TFDS cache; '' -> $LENX_DATA_DIR or ~/.cache/lenx/tensorflow_datasets
  c.books_dir = ""           # books corpus dir (MANIFEST.tsv + *.txt[.gz]); '' -> repo data/books
  c.text_dir = ""            # name=text_dir: directory of .txt/.txt.gz files (split rule: text.py)
  c.tfds_name = "pg19"       # name=tfds: TFDS dataset name (prepared as array_record in data_dir)
  c.text_key = "book_text"   # name=tfds: the text feature to read
  c.tokenizer = ""           # '' = bytes (vocab 256); a checkpoint spec (pretrained:NAME, .gguf
                             # file, HF dir): its BPE tokenizer (input_pipeline/tokenizer.py)
  c.needle_fraction = 0.0    # text: fraction of training windows that are pass-key examples
                             # (evaluation/needle.py; needle at a uniform depth); 0 = off
  c.needle_min_fraction = 1.0  # text: each pass-key example is a uniform length in
                             # [this x window, window], the window's text after it; 1 = full
  c.needle_keep_distances = False  # text, with needle_min_fraction < 1: needle distances
                             # drawn as in full windows (only the question's position varies)
  c.repeat_fraction = 0.0    # text: fraction of training windows holding a random span of
                             # letters/digits and, later, its repeat (teaches copying); 0 = off
  c.repeat_warmup_steps = 0  # text: the first N training steps use repeat windows only (an
                             # induction warm-up before the needle mixture starts)
  c.num_eval_sequences = 64  # synthetic tasks: number of fixed eval sequences per split

  c.markov = ml_collections.ConfigDict()
  c.markov.order = 2          # k: each token depends on the previous k tokens
  c.markov.vocab_size = 16    # V symbols (<= 256)
  c.markov.alpha = 0.5        # Dirichlet concentration of each transition row (small = peaky)
  c.markov.table_seed = -1    # seed of the transition table; -1 -> the task seed

  c.copy = ml_collections.ConfigDict()
  c.copy.vocab_size = 16      # V random symbols; token V is the separator (vocab V + 1)
  c.copy.prefix_len = 0       # n random symbols, then SEP + copies; 0 -> L // 2 (p SEP p)
  c.copy.loss_on = "all"      # 'all' tokens or only the 'copy' part

  c.passkey = ml_collections.ConfigDict()
  c.passkey.key_vocab = 64    # K key symbols
  c.passkey.value_vocab = 64  # Vv value symbols (vocab = K + Vv + 2 <= 256)
  c.passkey.key_len = 2       # tokens per key; needs K^key_len >= number of pairs in a window
  c.passkey.value_len = 1     # tokens per value (the answer length)
  c.passkey.loss_on = "all"   # 'all' tokens or only the 'answer'
  return c
