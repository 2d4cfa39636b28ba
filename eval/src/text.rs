//! Reading evaluation and calibration text: UTF-8, non-empty, with errors naming
//! the file. The reader lives in [`model::io`], below every stage that reads text.

pub use model::io::read_text;
