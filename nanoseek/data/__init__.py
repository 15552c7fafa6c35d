"""Data: the pretraining corpus, token shards, and the resumable iterators the trainer consumes.

    corpus.py   CorpusConfig, build_corpus(cfg, part="train"|"val") -> list[Document(text, kind, family, correct,
                language)], general_examples(n, seed) -> list[{"prompt", "response"}], number_words(n),
                prepare_corpus(out_dir, cfg, tok, progress=True) -> (train_dir, val_dir);
                corpus_texts / corpus_tokens(cfg, part[, tok]): the corpus chunk by chunk, over cfg.workers processes
    shards.py   write_shards(texts, tok, out_dir) -> index (streamed, linear); encode_documents(texts, tok) ->
                (tokens, lengths) batches; ShardWriter(folder, dtype, shard_tokens).add(tokens, lengths); load_index(dir);
                check_model_fit(model_config, vocab_size, seq_len);
                PackedDataset(dir, seq_len, batch_size, seed=0, shuffle=True, rank=0, world_size=1, model_config=None)
    sft.py      load_chat_records(path) -> list[{"prompt", "completion"}] (any of TRL's record formats, one per
                file); to_messages(record) -> one message list (conversational records);
                tokenize_example(tok, example, assistant_only_loss=True, completion_only_loss=True) ->
                (ids, trained_mask); SFTDataset(path | records, tok, seq_len, batch_size, seed=0, shuffle=True,
                rank=0, world_size=1, model_config=None, assistant_only_loss=True, completion_only_loss=True,
                truncation_mode="keep_start", packing=False) with .stats (truncated / dropped / no-loss counts)

Both datasets: `ds.next_batch(batch_size=None) -> (input_ids [B, T], labels [B, T])` long tensors, labels
aligned (labels[:, t] = target of position t, -100 = no loss); `iter(ds)` yields next_batch() forever;
`ds.state_dict()` / `ds.load_state_dict(state)` save and restore the position exactly (plain ints).
Under data parallelism pass rank/world_size: all ranks walk one order, each takes its slice of a batch.

Typical pretraining setup (what `nanoseek pretrain` does):

    tok = Tokenizer.train([d.text for d in build_corpus(cfg)], 1024)      # or Tokenizer.load(dir)
    train_dir, val_dir = prepare_corpus(run_dir / "data", cfg, tok)        # idempotent: reused when unchanged
    train = PackedDataset(train_dir, seq_len, batch_size, seed=seed, model_config=model_cfg)
    val_batches = [b for b, _ in zip(PackedDataset(val_dir, seq_len, batch_size, shuffle=False), range(4))]
"""

from nanoseek.data.corpus import CorpusConfig, Document, build_corpus, general_examples, prepare_corpus
from nanoseek.data.shards import PackedDataset, check_model_fit, load_index, write_shards
from nanoseek.data.sft import SFTDataset, load_chat_records, tokenize_example

__all__ = ["CorpusConfig", "Document", "PackedDataset", "SFTDataset", "build_corpus", "check_model_fit",
           "general_examples", "load_chat_records", "load_index", "prepare_corpus", "tokenize_example", "write_shards"]
