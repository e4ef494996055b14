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
    RS_CHAT_GEMMA,    /* <bos><start_of_turn>user\n...<end_of_turn>\n (Gemma 3: system + "\n\n"
                         prefixes the first user turn; Gemma 1/2 templates refuse a system role) */
    RS_CHAT_MISTRAL,  /* <s> [INST] ... [/INST] ...</s> (Mistral-7B-Instruct v0.1/v0.2 current
                         template: system + "\n\n" prefixes the first user turn) */
    RS_CHAT_CHATML,   /* <|im_start|>role\n...<|im_end|>\n (Qwen) */
} rs_chat_kind;

typedef struct {
    const char *role; /* "system", "user", "assistant" */
    const char *content;
} rs_chat_message;

/* "none", "llama-2", "llama-3", "gemma", "mistral", "chatml" (aliases "llama2", "llama3",
 * "qwen2"); -1 when unknown (no message). */
int rs_chat_kind_from_name(const char *name, rs_chat_kind *out);
const char *rs_chat_kind_name(rs_chat_kind kind);
/* Detect the family from the model's chat template: <model_dir>/chat_template.jinja, else
 * "chat_template" in tokenizer_config.json (a string, or a list of {name, template}: "default"
 * else the first), else chat_template.json. -1 with a message when there is no template or it
 * matches no family (the message names the INI setting [model] chat_template). Warns when the
 * template is a later version of the family that renders differently (e.g. Llama-3.1). */
int rs_chat_detect(const char *model_dir, rs_chat_kind *out);
/* Render messages as the family's template text, special tokens written as their strings
 * (e.g. "<s>"), exactly as transformers' apply_chat_template(tokenize=False) renders the
 * family's official template (tests/py/test_chat.py quotes them). add_generation_prompt appends
 * the assistant header (llama-2 and mistral templates have none). RS_CHAT_NONE concatenates the
 * contents. Returns a malloc'ed string, or NULL + message where the template raises (roles out
 * of order for llama-2/gemma/mistral, other roles for mistral) and for an empty conversation,
 * a NULL role/content or invalid UTF-8. Roles are free strings, as in the templates. */
char *rs_chat_render(rs_chat_kind kind, const rs_chat_message *msgs, int n_msgs,
                     int add_generation_prompt);
/* Render and tokenize as apply_chat_template(tokenize=True) does: the rendering is encoded
 * with add_special=0 (the templates write BOS themselves). RS_CHAT_NONE is encoded with
 * add_special=1, as tokenizer(text) would, since no template writes the specials. */
int rs_chat_encode(const rs_tokenizer *tok, rs_chat_kind kind, const rs_chat_message *msgs,
                   int n_msgs, int add_generation_prompt, int32_t **ids, int *n_ids);

#endif
