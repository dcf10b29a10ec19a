-- no-transaction
-- Text models are priced per request or per 1K tokens: the price table takes the unit `1k_tokens`, whose
-- `price_mc` is the input price and `output_price_mc` the output price (millicredits per 1K tokens; 0 for other
-- units). SQLite cannot change a CHECK in place, so the table is rebuilt with its ids kept (holds refer to them);
-- foreign keys are off only while the tables are swapped.
PRAGMA foreign_keys = OFF;
BEGIN IMMEDIATE;
CREATE TABLE model_prices_new (
  id INTEGER PRIMARY KEY,
  model TEXT NOT NULL,
  unit TEXT NOT NULL CHECK (unit IN ('image', 'second', 'request', '1k_tokens')),
  price_mc INTEGER NOT NULL CHECK (price_mc >= 0),
  output_price_mc INTEGER NOT NULL DEFAULT 0 CHECK (output_price_mc >= 0 AND (output_price_mc = 0 OR unit = '1k_tokens')),
  effective_from INTEGER NOT NULL,
  UNIQUE (model, unit, price_mc, output_price_mc)
) STRICT;
INSERT INTO model_prices_new (id, model, unit, price_mc, effective_from)
  SELECT id, model, unit, price_mc, effective_from FROM model_prices;
DROP TABLE model_prices;
ALTER TABLE model_prices_new RENAME TO model_prices;
COMMIT;
PRAGMA foreign_keys = ON;
