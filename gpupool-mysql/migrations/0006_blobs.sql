CREATE TABLE IF NOT EXISTS {prefix}blobs (
    hash  CHAR(40) NOT NULL,
    piece INT      NOT NULL,
    data  LONGBLOB NOT NULL,
    PRIMARY KEY (hash, piece)
) ENGINE = InnoDB
