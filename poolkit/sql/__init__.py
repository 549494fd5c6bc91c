"""Pure SQL text analysis: one lexer, the statement router (pooled or direct), normalisation for logs."""
