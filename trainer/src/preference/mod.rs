//! Learning from preferences: DPO on pairs (a preferred reply over another) and KTO on
//! replies labelled desirable or not, with TRL's losses, on a LoRA adapter whose
//! reference is the model the run starts from.

mod data;
pub mod loss;
mod run;

pub use data::{
    PreferenceCode, PreferenceData, PreferenceImport, PreferenceProblem, detect_kind,
    parse_preference_jsonl, parse_stored, preference_import,
};
pub use run::{micro_loss, train_preferences, weighted};
