//! Pipeline files (.tributary.yml): parsing with line/column errors, matrix and needs expansion into a plan
