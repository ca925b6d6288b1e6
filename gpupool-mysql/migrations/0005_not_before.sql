ALTER TABLE {prefix}jobs ADD COLUMN not_before DATETIME(6) NULL
