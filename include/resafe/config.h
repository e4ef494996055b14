/* config: the INI run config (configs/NAME.ini), checked against one schema table.
 *
 * Every key resafe reads is declared once in src/config.c with its type, default, range or
 * allowed values and a one-line description; `resafe config --doc` prints that table. A file is
 * parsed by inih and validated key by key: unknown sections and keys (with the closest known
 * name suggested), values of the wrong type or out of range, and duplicate keys are errors of
 * one line naming the file, the line, the section and the key. Unset keys read as their default.
 *
 * Value syntax (inih): `key = value`, comments start a line with ';' or '#', or follow a value
 * after " ;". A string value wrapped in double quotes loses them (to keep edge spaces); a string
 * can continue on indented lines (joined with '\n'; " ;" starts a comment there too). Lines
 * are limited to 198 characters. */
#ifndef RESAFE_CONFIG_H
#define RESAFE_CONFIG_H

#include <stdint.h>
#include <stdio.h>

typedef enum {
    RS_CFG_INT = 0, /* 64-bit integer within [min, max] */
    RS_CFG_FLOAT,   /* finite double within [min, max] (or (min, max] when min_open) */
    RS_CFG_BOOL,    /* true/false, yes/no, on/off, 1/0 */
    RS_CFG_STRING,  /* UTF-8 text */
    RS_CFG_PATH,    /* a file or directory name (not checked for existence here) */
    RS_CFG_ENUM     /* one of `allowed` ("a|b|c") */
} rs_config_type;

typedef struct {
    const char *section;
    const char *key;
    rs_config_type type;
    const char *def;     /* default, spelled as in a file ("" for an empty string or path) */
    const char *allowed; /* RS_CFG_ENUM: values separated by '|' */
    double min, max;     /* RS_CFG_INT, RS_CFG_FLOAT: inclusive range */
    int min_open;        /* RS_CFG_FLOAT: min itself is excluded */
    const char *used_by; /* the command that reads it; "(planned)" marks later stages */
    const char *doc;     /* one line */
} rs_config_key;

typedef struct rs_config rs_config;

/* The schema, in documentation order. */
const rs_config_key *rs_config_schema(int *n_keys);
const char *rs_config_type_name(rs_config_type type);

/* A config holding every default. */
rs_config *rs_config_new(void);
/* Parse INI text; `label` names it in messages. NULL (message recorded) on the first error. */
rs_config *rs_config_parse(const char *label, const char *text);
/* Read and parse a file. */
rs_config *rs_config_load(const char *path);
void rs_config_free(rs_config *cfg);

/* Override one key (command-line --set), with the file's validation. 0 ok, -1 + message. */
int rs_config_set(rs_config *cfg, const char *section, const char *key, const char *value);
/* "section.key=value" -> rs_config_set. */
int rs_config_set_arg(rs_config *cfg, const char *assignment);
/* Every "--set section.key=value" pair of a command line (argv[1..argc)), in order; the first
 * failure returns -1 with "--set: " before its message. */
int rs_config_apply_sets(rs_config *cfg, int argc, char **argv);

/* Typed getters: the value set, else the default. Asking for a key the schema lacks, or with
 * the wrong type, is a bug in the caller and exits. get_str serves string, path and enum keys. */
int64_t rs_config_get_int(const rs_config *cfg, const char *section, const char *key);
double rs_config_get_float(const rs_config *cfg, const char *section, const char *key);
int rs_config_get_bool(const rs_config *cfg, const char *section, const char *key);
const char *rs_config_get_str(const rs_config *cfg, const char *section, const char *key);
/* 1 when the file or rs_config_set gave the key a value. */
int rs_config_is_set(const rs_config *cfg, const char *section, const char *key);

/* The effective values as INI text (parses back to the same values); defaults marked. */
void rs_config_print(const rs_config *cfg, FILE *f);
/* Markdown: one table per section (key, type, default, allowed, used by, description). */
void rs_config_print_doc(FILE *f);

#endif
