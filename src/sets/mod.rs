//! Working sets: one actor per host starts and stops its managed backends as a unit, swaps between sets without
//! killing work, and tells requests whether their model can run now, after a swap, or not at all.

pub mod scheduler;
