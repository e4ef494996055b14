/* records: prompt and text files as tables of strings: .txt (one row per non-empty line; the
 * file's single column answers to any column name), .csv (header row, RFC 4180 quoting: fields in
 * double quotes may hold commas, newlines and "" for a quote; an Excel UTF-8 BOM is skipped) and
 * .jsonl (one object per non-blank line; a string member is a cell, a list member's first string
 * is its cell (MT-Bench "turns"), numbers are written as text; other members are absent).
 * Every row remembers its line for messages ("file:line: ..."). */
#ifndef RESAFE_RECORDS_H
#define RESAFE_RECORDS_H

typedef struct {
    char *path;
    int is_txt;
    int n_rows, n_cols;
    char **names; /* [n_cols] */
    char **cells; /* [n_rows * n_cols], NULL where a row lacks the column */
    int *lines;   /* [n_rows] 1-based line where the row starts */
} rs_table;

/* Read a whole file (max_rows > 0 stops after that many rows). Errors (-1 + one line naming the
 * file and line): unreadable, unknown extension (.txt, .csv, .jsonl only), malformed CSV/JSON,
 * a CSV row with a different field count than the header, an empty file. */
int rs_table_load(const char *path, int max_rows, rs_table *t);
void rs_table_free(rs_table *t);
/* Column index of `name`, or -1 (a .txt table has one column that every name finds). */
int rs_table_col(const rs_table *t, const char *name);
/* Like rs_table_col, but -1 + "path: no column 'name' (columns: a, b, c)" when absent. */
int rs_table_require(const rs_table *t, const char *name, int *col);
/* The cell, or NULL when absent (col < 0 gives NULL). */
const char *rs_table_cell(const rs_table *t, int row, int col);
/* The cell, or -1 + "path:line: no string member 'name'" / "... empty field 'name'" (allow_empty
 * 0) when absent. */
int rs_table_text(const rs_table *t, int row, int col, int allow_empty, const char **out);

#endif
