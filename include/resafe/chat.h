/* chat: chat templates for the model families, rendered in C (no Jinja).
 * The family is chosen by name in the INI ([model] chat_template) or detected from the
 * chat_template string in the model's tokenizer_config.json. */
#ifndef RESAFE_CHAT_H
#define RESAFE_CHAT_H

#include "resafe/tokenizer.h"

typedef enum {
    RS_CHAT_NONE = 0, /* raw text, no template */
    RS_CHAT_LLAMA2,   /* <s>[INST] <<SYS>>\n...\n<</SYS>>\n\n... [/INST] */
    RS_CHAT_LLAMA3,   /* <|begin_of_text|><|start_header_id|>...<|eot_id|> */
    RS_CHAT_GEMMA,    /* <bos><start_of_turn>user\n...<end_of_turn>\n */
    RS_CHAT_MISTRAL,  /* <s>[INST] ... [/INST]...</s> (system prepended to the first user turn) */
    RS_CHAT_CHATML,   /* <|im_start|>role\n...<|im_end|>\n (Qwen) */
} rs_chat_kind;

typedef struct {
    const char *role; /* "system", "user", "assistant" */
    const char *content;
} rs_chat_message;

/* "none", "llama-2", "llama-3", "gemma", "mistral", "chatml"; -1 when unknown (no message). */
int rs_chat_kind_from_name(const char *name, rs_chat_kind *out);
const char *rs_chat_kind_name(rs_chat_kind kind);
/* Detect the family from <model_dir>/tokenizer_config.json's chat_template (and bos/eos
 * strings). -1 with a message when there is no template or it matches no family. */
int rs_chat_detect(const char *model_dir, rs_chat_kind *out);
/* Render messages as the family's template text, special tokens written as their strings
 * (e.g. "<s>"), exactly as transformers' apply_chat_template(tokenize=False) renders the
 * family's official template. add_generation_prompt appends the assistant header.
 * Returns a malloc'ed string, or NULL + message (e.g. roles out of order for llama-2). */
char *rs_chat_render(rs_chat_kind kind, const rs_chat_message *msgs, int n_msgs,
                     int add_generation_prompt);
/* Render and tokenize as apply_chat_template(tokenize=True) does (no extra BOS). */
int rs_chat_encode(const rs_tokenizer *tok, rs_chat_kind kind, const rs_chat_message *msgs,
                   int n_msgs, int add_generation_prompt, int32_t **ids, int *n_ids);

#endif
