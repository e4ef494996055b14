/* tokenizer: Hugging Face tokenizer.json (BPE models).
 * Supported: byte-level BPE (GPT-2 / Llama-3 / Qwen style: ByteLevel pre-tokenizer with the
 * split regex, byte-to-unicode alphabet) and SentencePiece-converted BPE (Llama-2 / Mistral /
 * Gemma style: Metaspace or Prepend+Replace normalizer, byte_fallback <0xNN> tokens, fuse_unk),
 * added tokens (special and not), post-processor BOS/EOS templates. Anything else in the file
 * is an error naming the unsupported component. */
#ifndef RESAFE_TOKENIZER_H
#define RESAFE_TOKENIZER_H

#include "resafe/core.h"

typedef struct rs_tokenizer rs_tokenizer; /* opaque */

/* Load <path> (a tokenizer.json file, or a model directory holding one). NULL + message. */
rs_tokenizer *rs_tokenizer_load(const char *path);
/* Parse from memory; `label` names the file in messages (used by the fuzz target). */
rs_tokenizer *rs_tokenizer_parse(const char *label, const char *json_text, size_t len);
void rs_tokenizer_free(rs_tokenizer *tok);

/* Encode UTF-8 text. add_special: apply the post-processor (e.g. prepend BOS) as HF's
 * add_special_tokens=True does. Added/special tokens in the text are matched as HF does.
 * *ids is malloc'ed (caller frees). Returns 0, or -1 with a message (invalid UTF-8, ...). */
int rs_tokenizer_encode(const rs_tokenizer *tok, const char *text, size_t len, int add_special,
                        int32_t **ids, int *n_ids);
/* Decode ids to a malloc'ed NUL-terminated UTF-8 string (HF decode semantics;
 * skip_special drops special added tokens as skip_special_tokens=True). */
char *rs_tokenizer_decode(const rs_tokenizer *tok, const int32_t *ids, int n_ids, int skip_special);
/* The same, also giving the length: the text can hold NUL bytes (e.g. from a <0x00> token). */
char *rs_tokenizer_decode_n(const rs_tokenizer *tok, const int32_t *ids, int n_ids,
                            int skip_special, size_t *len);
/* The pre-tokenizer alone (no normalizer, no added tokens), as HF's
 * pre_tokenizer.pre_tokenize_str: the n pieces, concatenated in *text (malloc'ed) with their
 * byte lengths in *lens (malloc'ed). For inspecting and testing how text is split. */
int rs_tokenizer_pre_tokenize(const rs_tokenizer *tok, const char *text, size_t len, char **pieces,
                              size_t **lens, int *n);
int rs_tokenizer_vocab_size(const rs_tokenizer *tok); /* including added tokens: ids are 0 .. size-1 */
/* Token id of a piece/added token string, or -1. */
int32_t rs_tokenizer_token_to_id(const rs_tokenizer *tok, const char *piece);
/* The token's string as stored in the vocabulary (not decoded), or NULL. */
const char *rs_tokenizer_id_to_token(const rs_tokenizer *tok, int32_t id);
int rs_tokenizer_is_special(const rs_tokenizer *tok, int32_t id);

#endif
