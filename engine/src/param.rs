//! One trainable adapter tensor with its AdamW moments: what the trainer collects and steps,
//! and what data-parallel ranks average gradients over and broadcast.

use candle_core::{Tensor, Var};

use crate::adapter::ParamGroup;

/// One trainable tensor with its optimizer state.
pub(crate) struct Param {
    pub(crate) name: String,
    pub(crate) group: ParamGroup,
    pub(crate) var: Var,
    pub(crate) m: Tensor,
    pub(crate) v: Tensor,
}
