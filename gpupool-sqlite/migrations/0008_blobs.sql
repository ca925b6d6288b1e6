-- Snapshots of uncommitted code (gpupool_core::Blobs), by hash, in pieces
-- of at most 1 MiB (an empty one is one empty piece).
CREATE TABLE blobs (
    hash TEXT NOT NULL,
    piece INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (hash, piece)
) WITHOUT ROWID;
